"""The conformance suite: judges any backend against cpu_ref, op by op, block by block and as a whole model.

    python -m conformance --backend NAME [--interpret] [--simulate] [--level op,block,model] [--ops ...]
                          [--cases quick|full|gpu] [--report DIR] [--compare OTHER.json]
    python -m conformance new-backend NAME [--dir DIR]
    pytest conformance --backend NAME
"""

"""The conformance suite: judges any backend against cpu_ref, op by op, block by block and as a whole model.

    python -m conformance --backend NAME [--interpret] [--simulate] [--level op,block,model,dist] [--ops a,b]
                          [--cases quick|full|gpu] [--seed S] [--report DIR] [--junit FILE] [--compare OTHER.json]
    python -m conformance --backend NAME --cases SET --seed S --only CHECK      (one check of a report, alone)
    python -m conformance new-backend NAME [--dir DIR | --package DIR]
    pytest conformance --backend NAME

Reports (conformance/report.py): report.json, report.md (summary by operator, failures with the command that reruns
each alone, the error plot errors.png when matplotlib is installed), JUnit XML (junit.py); --compare knows about seeds
(report_diff.py); no machine paths (portable.py).
"""

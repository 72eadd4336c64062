#!/usr/bin/env bash
# Conformance reports of every in-tree backend on a CPU-only machine: cpu_ref and cpu (full case set), ascend against
# the torch_npu emulation, cuda and rocm through the Triton interpreter; cpu_ref on the quick set with its plot.
# Writes reports/cpu-<arch>/<run>/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=reports/cpu-$(uname -m)
status=0
python -m conformance --backend cpu_ref --report "$out/cpu_ref" || status=1
# the quick set with a fixed seed and its error plot (errors.png needs the plot extra: pip install -e '.[plot]')
python -m conformance --backend cpu_ref --cases quick --seed 20261201 --report "$out/cpu_ref-quick" || status=1
python -m conformance --backend cpu --report "$out/cpu" || status=1
python -m conformance --backend ascend --simulate --report "$out/ascend-simulate" || status=1
python -m conformance --backend cuda --interpret --report "$out/cuda-interpret" || status=1
python -m conformance --backend rocm --interpret --report "$out/rocm-interpret" || status=1
exit $status

#!/usr/bin/env bash
# One full call on a lent GPU machine (the device tool): conformance of the Triton backend without the
# interpreter, the per-operator benchmark and the whole-model decode benchmark, all written under $OUT
# (or reports/<device>/ when OUT is unset), each naming the device. Usage: bench/device_run.sh [cuda|rocm]
set -uo pipefail
cd "$(dirname "$0")/.."
backend=${1:-cuda}
python -m pip install -q -e . >/dev/null 2>&1 || true
device=$(python - <<'PY'
import torch
print(torch.cuda.get_device_name(0).replace(" ", "_") if torch.cuda.is_available() else "no-gpu")
PY
)
out=${OUT:-reports/$device}
mkdir -p "$out"
nvidia-smi -q > "$out/nvidia-smi.txt" 2>/dev/null || rocm-smi --showallinfo > "$out/rocm-smi.txt" 2>/dev/null || true
status=0
python -m conformance --backend "$backend" --cases full --report "$out/conformance-$backend" || status=1
python -m conformance --backend "$backend" --cases gpu --level op --report "$out/conformance-$backend-gpu-cases" || status=1
python bench/bench_ops.py --backend "$backend" --out "$out/bench-ops" || status=1
python bench/bench_decode.py --backend "$backend" --layers 3 --batches 1,32,128 --out "$out/bench-decode" || status=1
ls -R "$out"
exit $status

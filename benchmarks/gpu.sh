#!/usr/bin/env bash
# Every GPU check in one prepared command, for the first session that is lent a CUDA machine:
#   benchmarks/gpu.sh            (after `pip install -e ".[test]"`; about 8 minutes on one H100-class GPU)
# 1. `pytest -m gpu`: the Triton kernel compiled for real (not interpreted) against the reference, AMP training.
# 2. each GPU benchmark at sizes that fit the budget; each has its own limit, so one slow script cannot eat the rest.
# Results: benchmarks/results/{ms_deform_attn,train_step,inference,matcher}_cuda.json plus gpu_tests.log, copied to
# $OUT when it is set (the device tool's result folder). Commit the JSON files and the tables they print.
set -uo pipefail
cd "$(dirname "$0")/.."
results=benchmarks/results
mkdir -p "$results"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
export PYTHONUNBUFFERED=1
timeout 150 python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$results/gpu_tests.log"
timeout 120 python benchmarks/ms_deform_attn.py --iters 20 --dtypes float32,bfloat16
timeout 90 python benchmarks/train_step.py --iters 5 --warmup 2 --batch 2
timeout 90 python benchmarks/inference.py --iters 10 --warmup 3 --batches 1,4
timeout 45 python benchmarks/matcher.py --iters 5
if [ -n "${OUT:-}" ]; then
  cp "$results"/*_cuda.json "$results/gpu_tests.log" "$OUT"/ 2>/dev/null
fi
ls -l "$results"/*_cuda.json 2>/dev/null

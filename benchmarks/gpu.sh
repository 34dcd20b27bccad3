#!/usr/bin/env bash
# Every GPU check in one prepared command, sized for a 15-minute device lease (about 9 minutes of commands):
#   benchmarks/gpu.sh       (needs torch with CUDA and the package importable: `pip install -e ".[test]"`, or
#                            PYTHONPATH=src with the dependencies installed)
# 1. an import check that fails in seconds (so a broken environment costs no lease time);
# 2. `pytest -m gpu`: the Triton kernel compiled for real (not interpreted) against the reference, AMP training;
# 3. each GPU benchmark at sizes that fit the budget (eager only: torch.compile's first call alone costs minutes);
#    each has its own limit, so one slow script cannot eat the rest;
# 4. the convergence ablation at the demo's budget on the GPU (rows in order of interest; JSON after every row).
# Results: benchmarks/results/*_cuda.json, convergence_ablation_cuda.json, gpu_tests.log, and the whole log, copied
# to $OUT when it is set (the device tool's result folder) after every step. Commit the JSON files and the tables.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
results=$PWD/benchmarks/results
mkdir -p "$results"
export PYTHONUNBUFFERED=1
$PY -c "import torch, detrkit, detrkit.cli, detrkit.engine.evaluate; assert torch.cuda.is_available(), 'no CUDA device'
print(torch.__version__, torch.cuda.get_device_name())" || exit 1
save() { if [ -n "${OUT:-}" ]; then cp "$results"/*_cuda.json "$results/gpu_tests.log" "$OUT"/ 2>/dev/null; fi; }
step() {  # step LIMIT_S CMD...: run CMD under a time limit and say how it ended
  local limit=$1 t0=$SECONDS; shift
  echo "=== $* (limit ${limit} s)"
  timeout "$limit" "$@"
  echo "=== exit $? after $((SECONDS - t0)) s"
  save
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
step 110 bash -c "$PY -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee $results/gpu_tests.log"
step 80 $PY benchmarks/ms_deform_attn.py --iters 10 --dtypes float32,bfloat16 --compile false
step 70 $PY benchmarks/train_step.py --iters 5 --warmup 2 --batch 2 --compile false
step 60 $PY benchmarks/inference.py --iters 10 --warmup 3 --batches 1,4 --compile false
step 30 $PY benchmarks/matcher.py --iters 5
# RT-DETR-R18 / R50 against HF RTDetr with the same weights, at RT-DETR's own 640x640 input
step 45 $PY benchmarks/inference.py --models rtdetr_r18vd,rtdetr_r50vd --height 640 --width 640 --iters 10 \
  --warmup 3 --batches 1,4 --compile false --out "$results/inference_rtdetr_cuda.json"
step 45 $PY benchmarks/train_step.py --models rtdetr_r18vd,rtdetr_r50vd --height 640 --width 640 --iters 5 \
  --warmup 2 --batch 4 --compile false --out "$results/train_step_rtdetr_cuda.json"
step 190 $PY benchmarks/convergence_ablation.py --device cuda --num_workers 6 \
  --work_dir /tmp/ablation --out "$results/convergence_ablation_cuda.json" \
  --rows '["baseline", "hybrid + varifocal", "varifocal", "hybrid", "group", "mosaic", "mal", "hybrid + mal"]'
save
ls -l "$results"/*_cuda.json 2>/dev/null

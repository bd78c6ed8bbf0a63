#!/usr/bin/env bash
# Every GPU check of the project in one run on one H100/H200 (about 7 minutes):
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
# 1. the CUDA tests (fused Triton k-means assignment vs the chunked product; the negative draw
#    never waits for the host);
# 2. one Lloyd iteration part by part at N = 1,281,167, K = 25k/50k/100k: the fused assignment with
#    float16 and TF32 products and float16 with other tile shapes;
# 3. the ImageNet-scale E-step clustering benchmark (N = 1,281,167, K = 25k/50k/100k, 20 iters);
# 4. supervised vs MoCo v2 vs PCL step times (ResNet-50, 224 px, fp32 and bf16; each step synced
#    and 5 back to back), ops per step and the loss alone;
# 5. ResNet-50 at 224 px, bf16: the trainer's step under Accelerate, ZeRO-2 and ZeRO-3 against a
#    bare PyTorch loop (images/s, peak memory);
# 6. a short end-to-end run (digits, ZeRO-3, bf16) through `accelerate launch launch.py`;
# 7. throughput (about 8 minutes): the PCL step at ResNet-50, 224 px, bf16, batch 128, default
#    vs channels_last vs channels_last + compile, next to a tuned supervised step; the input
#    pipeline with 16 workers (JPEG 500 x 375, uint8, photometric in workers or on the GPU):
#      ONLY="cuda_tests step_options dataloader estep_clustering" bash benchmarks/gpu_check.sh OUT
# Each step has its own time limit; a failing step is logged and the next one runs.
# ONLY="cuda_tests train_step ..." runs just the steps named (in the order above).
# RESULTS_DIR gets gpu.txt (card, versions), summary.md (tables), all.log, engines.jsonl.
set -u
OUT=${1:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
LAUNCH="$PY -m accelerate.commands.launch"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name ($(date -u +%T)): $*" | tee -a "$OUT/all.log"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/step.log" 2>&1
  local rc=$?
  cat "$OUT/step.log" >> "$OUT/all.log"
  {
    echo "### $name: exit $rc after $((SECONDS - t0)) s"
    echo '```'
    echo "$*"
    grep -v -i -E "warn|deprecat|^\s*$" "$OUT/step.log" | tail -n 25
    echo '```'
  } >> "$OUT/summary.md"
  rm -f "$OUT/step.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton, accelerate, deepspeed; print('torch', torch.__version__, \
'triton', triton.__version__, 'accelerate', accelerate.__version__, 'deepspeed', \
deepspeed.__version__)" >> "$OUT/gpu.txt" 2>&1

step cuda_tests 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_kmeans_cuda.py tests/test_sharded_eval.py \
  tests/test_negatives.py tests/test_photometric.py
step assign 150 $PY benchmarks/assign.py --tiles 128,128,8,3 256,128,8,2 128,64,4,4 256,64,8,2
step estep_clustering 150 $PY benchmarks/estep.py --device cuda --n 1281167 \
  --ks 25000 50000 100000 --extract-n 0
step train_step 120 $PY benchmarks/train_step.py --device cuda --backbone resnet50 \
  --image-size 224 --batch-size 128
E="--backbone resnet50 --image-size 224 --batch-size 128 --precision bf16 --out $OUT/engines.jsonl"
step engine_bare 60 $PY benchmarks/engines.py --engine bare $E
step engine_accelerate 75 $LAUNCH --config_file accelerate_configs/gpu_1.yaml benchmarks/engines.py $E
step engine_zero2 75 $LAUNCH --config_file accelerate_configs/gpu_1_zero2.yaml benchmarks/engines.py $E
step engine_zero3 90 $LAUNCH --config_file accelerate_configs/gpu_1_zero3.yaml benchmarks/engines.py $E
step engines_table 10 $PY benchmarks/engines.py --report "$OUT/engines.jsonl"
step end_to_end_zero3 100 $LAUNCH --config_file accelerate_configs/gpu_1_zero3.yaml launch.py \
  run.output_dir=/tmp/pcl_e2e optim.epochs=3 pcl.warmup_epochs=1 run.mixed_precision=bf16
step step_options 360 $PY benchmarks/step_options.py --device cuda --backbone resnet50 \
  --image-size 224 --batch-size 128 --precision bf16 --variants default channels_last \
  "channels_last + compile" "channels_last + photometric on device" --json "$OUT/step_options.json"
step dataloader 150 $PY benchmarks/dataloader.py --n 256 --workers 16 --json "$OUT/dataloader.json"
echo "done ($(date -u +%T))" | tee -a "$OUT/all.log"

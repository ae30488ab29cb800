#!/usr/bin/env bash
# One prepared check of the CUDA path on a lent GPU machine (issue 15), in under 8 minutes:
#   1. installs what the machine lacks from the wheels in .whl/ (`make gpu-wheels` prepares them; no network there)
#   2. runs the CUDA-marked tests (tests/test_cuda.py)
#   3. Table 1's efficiency columns on ViT-B/16 (random init): latency per image at batch 256 and peak training
#      memory at batch 64, none / fpet x lora / adaptformer, fp32 and bf16 (scripts/compare.py, interleaved rounds)
#   4. one full-length run (100 epochs of the generated task's 1,000 training images, 10,000 test images at 224x224,
#      evaluation every 10 epochs) for merge=none and merge=fpet in bf16 with device-resident data
#   5. the official-like setting (fp32, DataLoader with worker processes) for none and fpet, OFFICIAL_EPOCHS (10)
#      long: its per-image costs, and its accuracy at epoch 10 against the bf16 run's (both still in the warm-up,
#      whose learning rate does not depend on the run's length; same seed and batches)
#   6. two bf16 runs sharing the GPU (hydra/launcher=local hydra.launcher.runs_per_gpu=2): the speed-up of sharing
#   7. the projected Table 2 study time (190 runs) from the measured per-image costs (scripts/study_time.py)
# Every step runs under a share of the time budget (BUDGET_S, default 450 s); a run cut short still gives its
# per-image costs from the epochs it finished. Everything printed also goes to $OUT/gpu_check.log; the summary JSON
# to $OUT/study.json.
#
#   bash scripts/gpu_check.sh               # on the GPU machine (the device tool's command: see README "On a GPU")
#   bash scripts/gpu_check.sh --cpu-smoke   # the same steps on the CPU at tiny sizes (vit_micro at 64x64, few
#                                           # images, 2 epochs): a few minutes, mostly Python start-up
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--cpu-smoke]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/fpet-gpu-check/out}"
WORK="${GPU_CHECK_WORK:-/tmp/fpet-gpu-check/work}"
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/runs" "$WORK"/efficiency_*.txt
if [[ -z "${GPU_CHECK_LOGGING:-}" ]]; then  # everything below, printed and written to the log (tee ends first)
  GPU_CHECK_LOGGING=1 bash "${BASH_SOURCE[0]}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HYDRA_FULL_ERROR=1 PROJECT_ROOT="$ROOT"
START=$(date +%s)
FAILED=()

if [[ $SMOKE == 1 ]]; then
  BUDGET_S="${BUDGET_S:-600}"  # a logic check: a slow shared CPU should not skip steps
  BACKBONE=(backbone=vit_micro backbone.img_size=64)  # 4x4 patches: the generated images render 12x faster
  DEVICE=cpu
  EFF=(bench.infer_batch=8 bench.train_batch=8 bench.repeats=1 bench.warmup=0)
  ROUNDS=1
  RUN_SIZE=(train.epochs=2 train.eval_every=1 dataset.num_test=64 train.limit_batches=2 train.batch_size=8
            train.eval_batch_size=32 optim.scheduler.warmup_t=0 bench.flops=false)
  OFFICIAL_EPOCHS="${OFFICIAL_EPOCHS:-2}"
  SHARED_EPOCHS=1
  WORKERS=2
  export FPET_CUDA_TESTS_DEVICE=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  TESTS=(tests/test_cuda.py -k "fpet or lock or fused or peak")  # the slower CPU dry-runs are left out
else
  BUDGET_S="${BUDGET_S:-450}"
  BACKBONE=(backbone=vit_b16 backbone.checkpoint=null)
  DEVICE=cuda
  EFF=(bench.infer_batch=256 bench.train_batch=64 bench.repeats=10 bench.warmup=3)
  ROUNDS=2
  RUN_SIZE=(train.epochs=100 train.eval_every=10 dataset.num_test=10000 train.eval_batch_size=512)
  OFFICIAL_EPOCHS="${OFFICIAL_EPOCHS:-10}"  # 100 would not fit the 8 minutes: fp32 is several times slower
  SHARED_EPOCHS=10
  WORKERS=8
  TESTS=(tests/test_cuda.py)
fi
# one run: 1,000 training images (train800val200), evaluation on the generated test split, no timing in the profile;
# WORKERS processes render the generated images (DataLoader workers, or the one read of train.loader=device)
COMMON=("${BACKBONE[@]}" pet=lora logger=none train.progress=false train.skip_finished=false seed=0
        bench.latency=false bench.train=false "dataset.num_workers=$WORKERS" "paths.output_dir=$WORK/outputs")

since() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN { printf "%.1f", t1 - t0 }'; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# step NAME MAX_SECONDS CMD...: run CMD under min(MAX_SECONDS, what is left of the budget); record a failure
step() {
  local name=$1 max=$2; shift 2
  local limit; limit=$(left)
  (( limit > max )) && limit=$max
  if (( limit < 10 )); then
    echo "== [$name] skipped: the time budget (BUDGET_S=$BUDGET_S s) is spent"; FAILED+=("$name (skipped)"); return
  fi
  echo "== [$name] (at most ${limit}s; $(( $(date +%s) - START ))s elapsed)"
  local t0; t0=$(date +%s.%N)
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  local rc=$?
  echo "== [$name] exit $rc after $(since "$t0")s"
  (( rc != 0 )) && FAILED+=("$name (exit $rc)")
  return 0
}

# train RUN_NAME MAX_SECONDS OVERRIDES...: one train.py run in $WORK/runs/RUN_NAME; its wall time -> wall_seconds
train() {
  local name=$1 max=$2; shift 2
  local dir="$WORK/runs/$name"
  local t0; t0=$(date +%s.%N)
  step "run $name" "$max" "$PY" train.py "${COMMON[@]}" "device=$DEVICE" "$@" "hydra.run.dir=$dir"
  mkdir -p "$dir"
  since "$t0" > "$dir/wall_seconds"
}

echo "== gpu_check $( [[ $SMOKE == 1 ]] && echo '--cpu-smoke' ) on ${HOSTNAME:-this machine}," \
  "$(date -u +%FT%TZ), budget ${BUDGET_S}s"
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. wheels (unless the packages import already), into a private folder put first on PYTHONPATH
NEEDED="import hydra, omegaconf, fvcore, hydra_plugins.hydra_joblib_launcher"
if [[ $SMOKE == 0 ]] && "$PY" -c "$NEEDED" 2>/dev/null; then
  echo "== [wheels] hydra-core, omegaconf, fvcore and the joblib launcher are installed"
elif ls .whl/*.whl >/dev/null 2>&1; then
  SITE="$WORK/site"
  step "wheels" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "   installed $(ls .whl/*.whl | wc -l) wheels into $SITE"
else
  echo "== [wheels] .whl/ is empty: run 'make gpu-wheels' where pip has an index, then carry .whl"; FAILED+=("wheels")
fi
"$PY" -c "$NEEDED, timm; print('   hydra', hydra.__version__, '| timm', timm.__version__)" \
  || { echo "== the training dependencies do not import; stopping"; exit 1; }

# 2. CUDA tests
step "cuda tests" 150 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

# 3. efficiency (Table 1 columns): per precision one compare.py call, every variant interleaved in rounds
for dtype in float32 bfloat16; do
  step "efficiency $dtype" 100 bash -o pipefail -c '"$@" | tee "'"$WORK/efficiency_$dtype.txt"'"' _ \
    "$PY" scripts/compare.py --rounds "$ROUNDS" \
    --variant "pet=lora merge=none" --variant "pet=lora merge=fpet" \
    --variant "pet=adaptformer merge=none" --variant "pet=adaptformer merge=fpet" \
    -- "${BACKBONE[@]}" "device=$DEVICE" "${EFF[@]}" bench.dtype=$dtype bench.merge_time=false
done

# 4. full-length bf16 runs with device-resident data; 5. the official-like setting
for merge in none fpet; do
  train "bf16_$merge" 150 "${RUN_SIZE[@]}" merge=$merge train.precision=bf16 train.loader=device
done
for merge in none fpet; do
  train "official_$merge" 90 "${RUN_SIZE[@]}" "train.epochs=$OFFICIAL_EPOCHS" merge=$merge train.precision=fp32 \
    train.loader=dataloader
done

# 6. two runs sharing the GPU through the local launcher (runs_per_gpu=2; device=auto claims a GPU slot), bf16
t0=$(date +%s.%N)
step "shared runs (runs_per_gpu=2)" 90 "$PY" train.py -m hydra/launcher=local hydra.launcher.runs_per_gpu=2 \
  "${COMMON[@]}" device=auto "${RUN_SIZE[@]}" "train.epochs=$SHARED_EPOCHS" merge=none,fpet train.precision=bf16 \
  train.loader=device "hydra.sweep.dir=$WORK/runs/shared" "hydra.sweep.subdir=\${merge.name}"
for merge in none fpet; do
  [[ -d "$WORK/runs/shared/$merge" ]] && since "$t0" > "$WORK/runs/shared/$merge/wall_seconds"
done

# 7. projection
echo "== [study time] measured per-image costs -> the Table 2 study"
"$PY" scripts/study_time.py --json "$OUT/study.json" \
  --efficiency "float32=$WORK/efficiency_float32.txt" --efficiency "bfloat16=$WORK/efficiency_bfloat16.txt" \
  --run "bf16/none=$WORK/runs/bf16_none" --run "bf16/fpet=$WORK/runs/bf16_fpet" \
  --run "official/none=$WORK/runs/official_none" --run "official/fpet=$WORK/runs/official_fpet" \
  --shared "bf16/none=$WORK/runs/shared/none" --shared "bf16/fpet=$WORK/runs/shared/fpet" --runs-per-gpu 2 \
  || FAILED+=("study time")

echo "== gpu_check finished in $(( $(date +%s) - START ))s; log: $OUT/gpu_check.log"
if (( ${#FAILED[@]} )); then
  echo "== FAILED: ${FAILED[*]}"
  exit 1
fi
echo "== all steps passed"

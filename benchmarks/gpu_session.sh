#!/usr/bin/env bash
# The first run on a CUDA machine, in the order things are learned: versions and one NF4 matmul,
# the tiny and 7B-shaped training-step benchmarks, Lightning fits of the tiny models on the device
# (GradCache, resume, QLoRA, FSDP2, the Qwen thinker), the re-ranker benchmark once it exists, and
# the GPU tests. Every step has its own timeout and log ($OUT/<step>.log) and prints its exit status,
# duration and log tail; a failing step does not stop the later ones. At the end a summary (device,
# date, each step's status and output, the benchmark tables) is appended to $RESULTS and copied to
# $OUT/summary.md.
#
#   bash benchmarks/gpu_session.sh                 # from the repository root, wheels in .whl/
#   STEPS="01_env 03_bench_7b" bash benchmarks/gpu_session.sh     # only these steps
#   ACC=cpu SKIP_PIP=1 bash benchmarks/gpu_session.sh              # dry run on CPU, smallest sizes
#
# Environment: OUT (logs; /tmp/gpu-session), ACC (gpu, or cpu for the dry run), PY (python3),
# SKIP_PIP (set: use the installed packages instead of installing .whl/*.whl into /tmp/site),
# WHEELS (.whl), RUNS (run folders, checkpoints; /tmp/gpu-session-runs), RESULTS (the file the
# summary is appended to; benchmarks/RESULTS.md on a GPU, $OUT/results.md in a dry run), STEPS
# (space-separated step names; all when empty), RERANK_ARGS (options of bench_rerank.py).
# See benchmarks/RESULTS.md ("First run on a CUDA machine") and benchmarks/gpu/ for the wheels.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-session}; ACC=${ACC:-gpu}; PY=${PY:-python3}; WHEELS=${WHEELS:-.whl}
RUNS=${RUNS:-/tmp/gpu-session-runs}; STEPS=${STEPS:-}; RERANK_ARGS=${RERANK_ARGS:-}
if [ "$ACC" = cpu ]; then RESULTS=${RESULTS:-$OUT/results.md}; else RESULTS=${RESULTS:-benchmarks/RESULTS.md}; fi
mkdir -p "$OUT" "$RUNS"
SUMMARY="$OUT/summary.md"
: > "$OUT/steps.tsv"

if [ -z "${SKIP_PIP:-}" ]; then
  # The CUDA image lacks bitsandbytes, jsonargparse, soundfile, soxr (and their needs) and has a
  # transformers without Qwen2_5OmniThinkerModel: benchmarks/gpu/wheels.txt lists what to bring.
  if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$WHEELS"/*.whl > "$OUT/00_pip.log" 2>&1; then
    echo "== 00_pip rc=0"
  else
    echo "== 00_pip failed"; tail -5 "$OUT/00_pip.log"
  fi
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

wanted() { [ -z "$STEPS" ] || [[ " $STEPS " == *" $1 "* ]]; }

step() {  # step NAME TIMEOUT_S TAIL_LINES CMD...
  local name=$1 t=$2 n=$3; shift 3
  wanted "$name" || return 0
  local s=$SECONDS
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - s))" >> "$OUT/steps.tsv"
  echo "== $name rc=$rc $((SECONDS - s))s"
  tail_of "$name" "$n"
}

tail_of() {  # the last N lines of a step's log without warnings, and its first errors
  grep -v -e Warning -e 'warnings.warn' "$OUT/$1.log" | tail -n "$2"
  grep -m3 -i -e 'non-finite' -e 'Error' "$OUT/$1.log" | grep -v -e 'FutureWarning' -e 'UserWarning'
}

skip() {  # skip NAME REASON
  wanted "$1" || return 0
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$OUT/steps.tsv"
  echo "== $1 skipped: $2"
}

if [ "$ACC" = cpu ]; then
  # Dry run: the same command lines at the smallest sizes, so that they are checked in minutes.
  FIRST=2 MORE=3 VAL=1 BENCH="--tiny --pairs 2 --audio-seconds 1 --steps 1 --warmup 0"
  # bitsandbytes' CPU kernel for eval mode needs 64 input features, more than the tiny width of 32
  QLORA_EVAL="--trainer.limit_val_batches 0"
  SMALL="--data.init_args.num_train 16 --data.init_args.num_val 8 --data.init_args.num_test 8
         --data.init_args.num_hard_pairs 2 --data.init_args.batch_size 8 --data.init_args.num_workers 0"
else
  FIRST=6 MORE=9 VAL=3 BENCH="--tiny --steps 2 --warmup 1" SMALL="--data.init_args.num_workers 4"
  QLORA_EVAL="--test_after_fit true --trainer.limit_test_batches 2"
fi
COMMON="--trainer.accelerator $ACC --trainer.devices 1 --trainer.precision bf16-mixed
        --model.backbone.init_args.dtype bfloat16 --model.backbone.init_args.gradient_checkpointing true
        --trainer.val_check_interval $VAL --trainer.check_val_every_n_epoch null --trainer.limit_val_batches 2
        --trainer.enable_progress_bar false --data.init_args.root $RUNS/data $SMALL"
# word splitting of the option strings is intended below
ALM2VEC="--config configs/alm2vec.yaml --config configs/tiny/alm2vec.yaml $COMMON"

# 1. versions, device, one NF4 matmul on the device against the dequantised weights (~15 s)
step 01_env 120 6 $PY -c "
import torch, transformers, peft, lightning, bitsandbytes as bnb
import lightning_modules  # the project imports on this transformers
from importlib.metadata import version
# what the image brings next to the wheels, to compare with pyproject.toml's lower bounds
print('torch', torch.__version__, 'cuda', torch.version.cuda, *(f'{n} {version(n)}' for n in [
      'transformers', 'tokenizers', 'huggingface-hub', 'peft', 'lightning', 'torchmetrics', 'tensorboard',
      'bitsandbytes', 'numpy']))
dev = 'cuda' if torch.cuda.is_available() else 'cpu'
print('device:', torch.cuda.get_device_name() if dev == 'cuda' else 'CPU (no CUDA)')
lin = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type='nf4').to(dev)
x = torch.randn(8, 256, device=dev, dtype=torch.bfloat16)
w = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
out = lin(x)
err = float((out.float() - x.float() @ w.T).abs().max() / (x.float() @ w.T).abs().max())
print('nf4 matmul', out.dtype, out.device, 'finite', bool(torch.isfinite(out).all()), 'rel. error vs dequantised', f'{err:.2e}')
assert err < 2e-2"
# 2. bench_gpu at tiny shapes on the device: meta -> to_empty, NF4 from materialised weights, fused
#    AdamW, checkpointing, both architectures (~30 s)
step 02_bench_tiny 150 11 $PY benchmarks/bench_gpu.py $BENCH
# 3. the measurement: 7B shapes, 8 rows (~2-3 min; each row prints when it is done)
step 03_bench_7b 330 12 $PY benchmarks/bench_gpu.py --steps 5 --warmup 2
# 4. Lightning on the device with the tiny MiDashengLM (ALM2Vec: GradCache, checkpointing, bf16-mixed),
#    validation every VAL steps
for run in gc qlora fsdp aurola; do  # a rerun starts its fits afresh (step 5 resumes step 4's)
  case $run in gc) name=04_fit_gradcache ;; qlora) name=06_qlora ;; fsdp) name=07_fsdp2 ;; *) name=08_aurola ;; esac
  wanted $name && rm -rf "${RUNS:?}/$run"
done
step 04_fit_gradcache 240 3 $PY main.py fit $ALM2VEC --trainer.max_steps $FIRST --trainer.default_root_dir "$RUNS/gc"
# 5. resume from its last checkpoint: optimiser, loops, CUDA random state
step 05_resume 180 3 $PY main.py fit $ALM2VEC --trainer.max_steps $MORE --trainer.default_root_dir "$RUNS/gc" \
  --ckpt_path "$RUNS/gc/lightning_logs/version_0/checkpoints/last.ckpt"
# 6. QLoRA through Lightning (tiny model quantised on the CPU, moved to the device), then the test
#    split on the device with the best checkpoint
step 06_qlora 240 3 $PY main.py fit $ALM2VEC --trainer.max_steps $FIRST \
  --model.backbone.init_args.lora.quantize_4bit true --trainer.default_root_dir "$RUNS/qlora" $QLORA_EVAL
# 7. FSDP2 on one device: NCCL group, fully_shard with mixed bf16/fp32 units, DTensor grads, sharded
#    checkpoint
step 07_fsdp2 240 3 $PY main.py fit $ALM2VEC --config configs/strategy/fsdp.yaml --trainer.max_steps $FIRST \
  --trainer.default_root_dir "$RUNS/fsdp"
# 8. the tiny Qwen thinker (AuroLA: left padding, trainable audio tower, Hybrid-NCE)
step 08_aurola 180 3 $PY main.py fit --config configs/aurola.yaml --config configs/tiny/aurola.yaml $COMMON \
  --trainer.max_steps $FIRST --trainer.default_root_dir "$RUNS/aurola"
# 9. the re-ranker benchmark, once the project has one
if [ -f benchmarks/bench_rerank.py ]; then
  step 09_bench_rerank 300 12 $PY benchmarks/bench_rerank.py $RERANK_ARGS
else
  skip 09_bench_rerank "benchmarks/bench_rerank.py does not exist yet"
fi
# 10. the GPU tests (and the tests that place models on CUDA where it is present)
step 10_pytest_gpu 480 15 $PY -m pytest -q -m "not slow" tests/test_gpu.py tests/test_qlora.py tests/test_bench_gpu.py

# The summary: device, date, each step's status and output tail, the benchmark tables.
DEVICE=$($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')" 2>/dev/null | tail -1)
{
  echo
  echo "## First-run session (\`benchmarks/gpu_session.sh\`): ${DEVICE:-unknown device}, $(date -u +%Y-%m-%d)"
  echo
  [ "$ACC" = cpu ] && echo "Dry run on CPU at the smallest sizes (no measurement)." && echo
  [ -f "$OUT/01_env.log" ] && grep -m1 '^torch ' "$OUT/01_env.log" | sed 's/^/Versions: /' && echo
  echo "| step | exit status | seconds |"
  echo "|---|---|---|"
  while IFS=$'\t' read -r name rc seconds reason; do
    echo "| $name | $rc${reason:+ ($reason)} | $seconds |"
  done < "$OUT/steps.tsv"
  for name in 02_bench_tiny 03_bench_7b 09_bench_rerank; do
    [ -f "$OUT/$name.log" ] || continue
    echo
    echo "$name:"
    echo
    grep -e '^|' -e 'pairs of' -e 'no CUDA' "$OUT/$name.log"
  done
  echo
  echo "Log tails:"
  echo
  echo '```'
  while IFS=$'\t' read -r name rc seconds reason; do
    [ "$rc" = skipped ] && continue
    echo "== $name rc=$rc ${seconds}s"
    tail_of "$name" 4
  done < "$OUT/steps.tsv"
  echo '```'
} > "$SUMMARY"
cat "$SUMMARY" >> "$RESULTS"
echo "summary appended to $RESULTS (and in $SUMMARY)"
exit 0

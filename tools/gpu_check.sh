#!/usr/bin/env bash
# The one-GPU check: everything of this project that needs CUDA, in one call of at most ~8 minutes,
# at world size 1 everywhere (two NCCL processes cannot share one GPU).
#
#   bash tools/gpu_check.sh                 # on a machine with one (or more) GPU
#   bash tools/gpu_check.sh --cpu-dry-run   # every step that can run on CPU, at shrunk shapes
#
# Steps (each under its own time limit; a failing step does not stop the others):
#   1. tests/test_megatron_backend.py: parallel.backend=megatron with and without its distributed
#      optimizer, losses equal to the torch backend through growth and the cut, resume across the
#      cut (world size 1 on one GPU; on CPU the GPU tests skip and the refusal test runs); the
#      distributed optimizer's state export/import at DP=2 runs on CPU through a double of its
#      sharding (two NCCL processes cannot share one GPU)
#   2. a TP=1 GPT through the real entry point (launch/torchrun.sh --nproc 1), torch backend, fp32
#   3. the same in bf16 (autocast over fp32 master weights)
#   4. DeepSpeed ZeRO-2 and ZeRO-3 on the GPU, same run
#   5. the losses of 2-4 compared: ZeRO-2/3 equal to the torch backend (rel 1e-4); bf16 as
#      inrank_megatron.training.compare.bf16_loss_problems says: step 1 (same weights and batch)
#      different from fp32 (autocast ran) by at most 2**-12, every step within 2**-8 (a missing
#      autocast or a loss reduced in bf16 fails it: tests/test_training_unit.py)
#   6. tools/bench_step.py at gpt2-medium, seq 1024, bf16: dense vs InRank tokens/s and MFU (H200
#      bf16 dense peak 989 TFLOP/s), after the cut at 0.33 x d and in stage 1 at the spec's buffer,
#      peak memory of each (--cpu-dry-run: gpt2-medium's config at 2 x 256, seq 64)
# Prints everything in one go, then one line per step; exit status 1 if a step failed, 2 if there
# is no GPU and no --cpu-dry-run. Logs and the bench's JSON go to $OUT (if set) or a temp dir.
# Expects the project's venv (.venv) or an environment with torch (CUDA build), megatron-core
# 0.16.1, deepspeed 0.19.8 and pytest; the tiny runs build data/wiki_sp8k_* on first use.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in
  --cpu-dry-run) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_check.sh: error: unknown argument '$1'; expected --cpu-dry-run or nothing" >&2; exit 2 ;;
esac
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHON=${PYTHON:-python}
RESULTS=${OUT:-$(mktemp -d /tmp/gpu_check_out.XXXXXX)}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$RESULTS"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1

START=$SECONDS
# All steps together: 470 s on a GPU (the check must fit 8 minutes); a CPU dry run is slower.
BUDGET=${GPU_CHECK_BUDGET_S:-$([ "$DRY" -eq 1 ] && echo 1800 || echo 470)}
PASSED=() FAILED=()

# step NAME LIMIT_S COMMAND...: run it under min(LIMIT_S, what is left of the budget).
step() {
  local name=$1 limit=$2; shift 2
  [ "$DRY" -eq 1 ] && limit=$((limit * 4))
  local left=$((BUDGET - (SECONDS - START)))
  [ "$left" -lt "$limit" ] && limit=$left
  echo
  echo "=== [$((SECONDS - START)) s] $name (limit $limit s)"
  if [ "$limit" -lt 15 ]; then
    FAILED+=("$name: not run, the ${BUDGET} s budget is spent"); return
  fi
  local t0=$SECONDS rc=0
  if declare -F "$1" >/dev/null; then  # a function of this script: run it in a child bash
    timeout -k 10 "$limit" bash -o pipefail -c "$(declare -p RUN WORK); $(declare -f "$1"); \"\$@\"" \
      _ "$@" \
      || rc=$?
  else
    timeout -k 10 "$limit" "$@" || rc=$?
  fi
  if [ "$rc" -eq 0 ]; then PASSED+=("$name ($((SECONDS - t0)) s)")
  else FAILED+=("$name: exit $rc after $((SECONDS - t0)) s$([ "$rc" -eq 124 ] && echo ', timed out')"); fi
}

"$PYTHON" - "$DRY" <<'PY'
import sys, torch
n = torch.cuda.device_count()
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, {n} GPU(s)"
      + "".join(f"\n  GPU {i}: {torch.cuda.get_device_name(i)}, "
                f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB" for i in range(n)))
if n == 0 and sys.argv[1] != "1":
    print("gpu_check.sh: error: no GPU; run with --cpu-dry-run to check the steps on CPU")
    sys.exit(2)
PY
[ $? -eq 0 ] || exit 2

# A short run: growth every 2 steps from step 2, the cut after step 8 (tests/test_train_runs.py).
RUN=(train.steps=16 train.lr_warmup_steps=2 train.log_interval=1 train.eval_interval=8
     train.eval_iters=1 train.save_interval=8 inrank.warmup=2 inrank.gap=2 inrank.stage1_steps=8
     output.plot=false model.seq_length=64 train.micro_batch_size=2 train.global_batch_size=4
     parallel.tensor_model_parallel_size=1)
BENCH=(--config configs/gpt2-medium.yaml --seq 1024 --micro 8 --steps 5 --repeats 2)
if [ "$DRY" -eq 1 ]; then
  RUN+=(model.num_layers=2 train.steps=10 train.eval_interval=5 train.save_interval=5)
  BENCH=(--config configs/gpt2-medium.yaml --seq 64 --micro 1 --steps 1 --repeats 1
         model.num_layers=2 model.hidden_size=256 model.num_attention_heads=4
         model.ffn_hidden_size=1024)
fi
train() {  # train NAME OVERRIDES...: the real entry point, one process
  launch/torchrun.sh --nproc 1 configs/tiny-cpu.yaml "${RUN[@]}" "output.dir=$WORK/$1" "${@:2}" \
    2>&1 | { grep -v -e 'train:' -e 'Warning' -e 'warnings.warn' || true; }  # tqdm, import noise
}

step "megatron backend tests (world size 1)" 200 \
  "$PYTHON" -m pytest -rs -v -p no:cacheprovider tests/test_megatron_backend.py
step "TP=1 GPT, launch/torchrun.sh --nproc 1, fp32" 60 train fp32
step "TP=1 GPT, bf16" 60 train bf16 train.precision=bf16
step "DeepSpeed ZeRO-2" 70 train zero2 parallel.backend=deepspeed \
  parallel.deepspeed_config=configs/deepspeed/zero2.json
step "DeepSpeed ZeRO-3" 70 train zero3 parallel.backend=deepspeed \
  parallel.deepspeed_config=configs/deepspeed/zero3.json
step "losses: ZeRO-2/3 = torch (rel 1e-4), bf16 = fp32 under autocast" 30 "$PYTHON" - "$WORK" <<'PY'
import json, math, os, sys
from inrank_megatron.training.compare import bf16_loss_problems
work = sys.argv[1]
def losses(name):
    path = os.path.join(work, name, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["train_losses"]
ref = losses("fp32")
if ref is None:
    sys.exit("the fp32 torch run did not finish: nothing to compare against")
print("step " + " ".join(f"{n:>9}" for n in ("fp32", "bf16", "zero2", "zero3")))
runs = {n: losses(n) for n in ("bf16", "zero2", "zero3")}
for i, r in enumerate(ref):
    print(f"{i + 1:4d} {r:9.5f} " + " ".join(f"{v[i]:9.5f}" if v else f"{'-':>9}" for v in runs.values()))
bad = []
for name in ("zero2", "zero3", "bf16"):
    got = runs[name]
    if got is None or len(got) != len(ref):
        bad.append(f"{name}: no complete run")
        continue
    rel = [abs(a - b) / abs(b) for a, b in zip(got, ref)]
    print(f"{name}: relative difference to fp32 torch at step 1 {rel[0]:.2e}, max {max(rel):.2e}")
    if name == "bf16":
        bad += bf16_loss_problems(ref, got)
    elif max(rel) > 1e-4 or not all(math.isfinite(v) for v in got):
        bad.append(f"{name}: {max(rel):.2e} > 1e-4 or non-finite")
if bad:
    sys.exit("; ".join(bad))
PY
step "bench_step.py gpt2-medium bf16: dense / stage 1 / after the cut" 200 \
  "$PYTHON" tools/bench_step.py "${BENCH[@]}" --precision bf16 --peak-tflops 989 \
  --arms dense stage1 cut --json "$RESULTS/bench_gpt2_medium_bf16.json"

echo
echo "=== gpu_check: $((SECONDS - START)) s$([ "$DRY" -eq 1 ] && echo ', CPU dry run')"
for s in "${PASSED[@]}"; do echo "  ok     $s"; done
for s in "${FAILED[@]}"; do echo "  FAILED $s"; done
rm -rf "$WORK"
[ "${#FAILED[@]}" -eq 0 ]

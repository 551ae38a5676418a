# Shared by the launch scripts in this directory: sourced, not run.
#
# Every script validates its input here BEFORE it starts a training process, and reports a bad
# input as one line on stderr ("<script>: error: ...") with exit status 2.
#
# Knobs read here (all optional):
#   PYTHON                 interpreter of the training processes (default: python on PATH)
#   INRANK_TRAIN_MODULE    module to run (default inrank_megatron.train)
#   OMP_NUM_THREADS        threads per process (default: cores on the node / processes on it)

SCRIPT=${SCRIPT:-$(basename "$0")}
PYTHON=${PYTHON:-python}
TRAIN_MODULE=${INRANK_TRAIN_MODULE:-inrank_megatron.train}
LAUNCH_DIR=${LAUNCH_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
# The package need not be installed: run from the checkout these scripts belong to.
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "$SCRIPT: error: $*" >&2; exit 2; }
info() { echo "$SCRIPT: $*" >&2; }

# The header comment of the calling script (its usage), without the leading "# ".
usage() { sed -n '2,/^[^#]/p' "$0" | sed -n '/^#/p' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; }

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

# GPUs visible to this process: CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else 0.
gpu_count() {
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    local ids=${CUDA_VISIBLE_DEVICES//,/ }
    [ "$ids" = "-1" ] && { echo 0; return; }
    set -- $ids; echo $#
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

# check_nproc N GPUS CORES WHAT: N processes fit the node (N <= GPUS on GPU, N <= 2 * CORES on
# CPU, where gloo processes only need to make progress, not to be fast).
check_nproc() {
  local n=$1 gpus=$2 cores=$3 what=$4
  is_count "$n" || die "$what must be a positive integer, got '$n'"
  if [ "$gpus" -gt 0 ]; then
    [ "$n" -le "$gpus" ] || die "$what=$n exceeds the $gpus GPU(s) on this node; expected <= $gpus"
  else
    [ "$n" -le $((2 * cores)) ] || die "$what=$n exceeds 2 x $cores CPU core(s) on this node (no GPU); expected <= $((2 * cores))"
  fi
}

# check_config CONFIG WORLD [OVERRIDES...]: the file exists, the overrides parse, the config and
# file rules pass (the layout divides WORLD processes; data, tokenizer, output dir, resume:
# inrank_megatron.rules), and the training module exists (python -m inrank_megatron.launch_env
# check). Prints its notes, warnings and summary line on success; dies with its one-line message
# otherwise.
check_config() {
  local config=$1 world=$2; shift 2
  [ -f "$config" ] || die "config file not found: $config"
  local out rc=0
  out=$("$PYTHON" -m inrank_megatron.launch_env check "$config" --world-size "$world" \
        --train-module "$TRAIN_MODULE" "$@" 2>&1) || rc=$?
  if [ "$rc" -ne 0 ]; then
    out=$(printf '%s\n' "$out" | grep -v '^\s*$' | tail -n 1)
    die "${out#error: }"
  fi
  # Notes (what an override implied) and warnings, then the summary line.
  { printf '%s\n' "$out" | grep -E '^(note|warning): ' || true; } | while IFS= read -r line; do info "$line"; done
  info "$(printf '%s\n' "$out" | tail -n 1)"
  # The training processes skip printing what this pre-flight printed already.
  export INRANK_PREFLIGHT=1
}

# set_threads PROCS_ON_NODE GPUS CORES: OMP threads per process, and Megatron's requirement of
# one hardware queue per device on GPUs (the order of TP communication and compute kernels).
set_threads() {
  local procs=$1 gpus=$2 cores=$3 per
  per=$((cores / procs)); [ "$per" -ge 1 ] || per=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$per}
  if [ "$gpus" -gt 0 ]; then export CUDA_DEVICE_MAX_CONNECTIONS=1; fi
}

# parse_single_node_args "$@": --help, --nproc N, then CONFIG and overrides. Sets NPROC, CONFIG
# and OVERRIDES; NPROC defaults to the GPUs of this node, or 2 without GPUs.
parse_single_node_args() {
  NPROC=${NPROC:-}
  while [ $# -gt 0 ]; do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --nproc) [ $# -ge 2 ] || die "--nproc needs a value"; NPROC=$2; shift 2 ;;
      --nproc=*) NPROC=${1#--nproc=}; shift ;;
      --) shift; break ;;
      -*) die "unknown option '$1'; see --help" ;;
      *) break ;;
    esac
  done
  [ $# -ge 1 ] || die "missing CONFIG; usage: $SCRIPT [--nproc N] CONFIG [section.key=value ...]"
  CONFIG=$1; shift
  OVERRIDES=("$@")
  GPUS=$(gpu_count)
  CORES=$(nproc)
  if [ -z "$NPROC" ]; then
    if [ "$GPUS" -gt 0 ]; then NPROC=$GPUS; else NPROC=2; fi
  fi
  check_nproc "$NPROC" "$GPUS" "$CORES" "--nproc"
}

# torchrun's flags for a graceful stop: it forwards these signals to its ranks (SIGUSR1 is Slurm's
# --signal), which finish their step, save a checkpoint and exit 75 (inrank_megatron/training/
# stop.py); it waits STOP_TIMEOUT seconds for that before it kills them (torch's default, 30 s, is
# short for a large checkpoint).
torchrun_stop_args() {
  local timeout=${STOP_TIMEOUT:-600}
  is_count "$timeout" || die "STOP_TIMEOUT must be a positive integer (seconds), got '$timeout'"
  TORCHRUN_STOP_ARGS=(--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
                      --shutdown-timeout="$timeout")
}

# run_job_step CMD...: run CMD (the job's srun step) with the batch script passing SIGUSR1 and
# SIGTERM on to it, so every rank finishes its step, saves a checkpoint and exits 75
# (inrank_megatron/training/stop.py). Slurm sends the batch script SIGUSR1 ahead of the time limit
# (#SBATCH --signal=B:USR1@SECONDS); after it the job requeues itself (scontrol requeue) and,
# run again, continues from its checkpoint (see requeued_overrides). Returns CMD's status.
run_job_step() {
  local pid rc=0 got=
  trap 'got=USR1; kill -s USR1 "$pid" 2>/dev/null || true' USR1
  trap 'got=TERM; kill -s TERM "$pid" 2>/dev/null || true' TERM
  "$@" &
  pid=$!
  # bash runs a trap only between commands: wait returns early for one, so wait again.
  while :; do
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [ "$got" = USR1 ]; then
    info "SIGUSR1 (time limit ahead): requeueing job $SLURM_JOB_ID to continue from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || info "scontrol requeue $SLURM_JOB_ID failed; resubmit with output.resume=auto"
  fi
  return "$rc"
}

# requeued_overrides: a requeued run (SLURM_RESTART_COUNT > 0: the time-limit requeue above,
# a node failure or a preemption with --requeue) continues from its newest checkpoint, whatever
# output.resume the submission named: appends output.resume=auto to OVERRIDES.
requeued_overrides() {
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    OVERRIDES+=(output.resume=auto)
    info "restart $SLURM_RESTART_COUNT of job $SLURM_JOB_ID: output.resume=auto"
  fi
}

# Inside a Slurm job: NNODES and the first node's host name (the rendezvous host).
slurm_first_host() {
  local hosts
  hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null) \
    || hosts=$("$PYTHON" -c 'import sys; from inrank_megatron.launch_env import parse_nodelist; print("\n".join(parse_nodelist(sys.argv[1])))' "$SLURM_JOB_NODELIST")
  printf '%s\n' "$hosts" | head -n "${1:-1}"
}

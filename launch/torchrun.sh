#!/bin/bash
# Train on one node with torchrun (one process per GPU; gloo processes on CPU).
#
#   launch/torchrun.sh [--nproc N] CONFIG [section.key=value ...]
#
#   launch/torchrun.sh configs/tiny-cpu.yaml                       # 2 processes on CPU
#   launch/torchrun.sh --nproc 8 configs/gpt-small.yaml output.dir=runs/x
#
# Runs `torchrun --standalone --nproc_per_node N -m inrank_megatron.train --config CONFIG ...`
# from the current directory (configs' relative paths are read from there: run it from the
# repository root). --nproc defaults to the node's GPUs, or 2 without GPUs (also env NPROC).
# Before starting anything it checks that CONFIG exists, that N fits the node (<= GPUs; <= 2 x
# cores on CPU) and that the config's layout divides N (TP * PP | N, batch sizes); a bad input is
# one line on stderr and exit status 2. The training processes pick NCCL on GPUs, gloo on CPU.
# SIGTERM or SIGUSR1 to this script (torchrun) stops the run gracefully: every rank finishes its
# step, saves a checkpoint and exits 75 (torchrun itself then exits 1); output.resume=auto
# continues. A second signal kills at once.
# Env: PYTHON, INRANK_TRAIN_MODULE, OMP_NUM_THREADS (default cores / N), TORCHRUN_ARGS (extra
# torchrun flags), STOP_TIMEOUT (seconds torchrun waits for the ranks to save after a signal;
# default 600).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_single_node_args "$@"
check_config "$CONFIG" "$NPROC" "${OVERRIDES[@]}"
set_threads "$NPROC" "$GPUS" "$CORES"
torchrun_stop_args

# --standalone: a c10d rendezvous on localhost with a free port (no MASTER_PORT clashes).
# torchrun runs in this process through inrank_megatron.launcher: a failure ends in rank 0's line
# and one of ours (exit status, the file holding torchrun's agent report).
exec "$PYTHON" -m inrank_megatron.launcher torchrun --name "$SCRIPT" -- --standalone --nnodes=1 \
  --nproc_per_node="$NPROC" "${TORCHRUN_STOP_ARGS[@]}" ${TORCHRUN_ARGS:-} -m "$TRAIN_MODULE" \
  --config "$CONFIG" "${OVERRIDES[@]}"

#!/bin/bash
# Train on one node with OpenMPI's mpirun (one process per GPU; gloo processes on CPU).
#
#   launch/mpirun.sh [--nproc N] CONFIG [section.key=value ...]
#
#   launch/mpirun.sh --nproc 2 configs/tiny-cpu.yaml output.dir=runs/mpi
#
# Runs `mpirun -np N --bind-to none python -m inrank_megatron.train --config CONFIG ...` (plus
# --allow-run-as-root as root and --oversubscribe past the core count). MPI only starts the
# processes: each one reads its rank from OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK, and rank 0 picks
# MASTER_ADDR/MASTER_PORT and broadcasts them over MPI (mpi4py) unless they are exported
# (inrank_megatron/launch_env.py); training then runs on torch.distributed (NCCL on GPUs, gloo on
# CPU). --nproc defaults to the node's GPUs, or 2 without GPUs (also env NPROC). Before starting
# anything it checks that CONFIG exists, that N fits the node (<= GPUs; <= 2 x cores on CPU) and
# that the config's layout divides N; a bad input is one line on stderr and exit status 2.
# Env: PYTHON, INRANK_TRAIN_MODULE, OMP_NUM_THREADS (default cores / N), MASTER_ADDR and
# MASTER_PORT (optional), MPIRUN_ARGS (extra mpirun flags).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_single_node_args "$@"
command -v mpirun >/dev/null || die "mpirun not found; install OpenMPI (apt-get install openmpi-bin)"
check_config "$CONFIG" "$NPROC" "${OVERRIDES[@]}"
set_threads "$NPROC" "$GPUS" "$CORES"

args=(-np "$NPROC" --bind-to none)
[ "$(id -u)" != 0 ] || args+=(--allow-run-as-root)
[ "$NPROC" -le "$CORES" ] || args+=(--oversubscribe)
# -q: no "Primary job terminated normally, but..." help blocks after rank 0's error line.
[ "${INRANK_DEBUG:-0}" != 0 ] || args+=(-q)
# Local ranks inherit the environment; -x also carries these to remote ones (MPIRUN_ARGS -H ...).
for var in PATH PYTHONPATH LD_LIBRARY_PATH OMP_NUM_THREADS CUDA_DEVICE_MAX_CONNECTIONS \
           MASTER_ADDR MASTER_PORT INRANK_TRAIN_MODULE; do
  [ -z "${!var+x}" ] || args+=(-x "$var")
done

exec "$PYTHON" -m inrank_megatron.launcher run --name "$SCRIPT" -- \
  mpirun "${args[@]}" ${MPIRUN_ARGS:-} "$PYTHON" -m "$TRAIN_MODULE" --config "$CONFIG" "${OVERRIDES[@]}"

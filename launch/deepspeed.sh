#!/bin/bash
# Train on one node with the DeepSpeed launcher (one process per GPU; gloo processes on CPU).
#
#   launch/deepspeed.sh [--nproc N] CONFIG [section.key=value ...]
#
#   launch/deepspeed.sh configs/tiny-cpu.yaml parallel.backend=deepspeed \
#       parallel.deepspeed_config=configs/deepspeed/zero1.json
#
# Runs `deepspeed --num_gpus N --master_port P --module inrank_megatron.train --config CONFIG ...`
# (DeepSpeed 0.19.8's --module runs the package module like `python -m`; each process also gets
# --local_rank). The launcher does not choose the optimizer backend: the config's
# parallel.backend does (set parallel.backend=deepspeed and parallel.deepspeed_config for ZeRO).
# --nproc defaults to the node's GPUs, or 2 without GPUs (also env NPROC). Before starting
# anything it checks that CONFIG exists, that N fits the node (<= GPUs; <= 2 x cores on CPU) and
# that the config's layout divides N; a bad input is one line on stderr and exit status 2.
# Env: PYTHON, INRANK_TRAIN_MODULE, OMP_NUM_THREADS (default cores / N), MASTER_PORT (default: a
# free port), DEEPSPEED_ARGS (extra launcher flags, e.g. --bind_cores_to_rank).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_single_node_args "$@"
check_config "$CONFIG" "$NPROC" "${OVERRIDES[@]}"
set_threads "$NPROC" "$GPUS" "$CORES"
PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# On CPU DeepSpeed picks its CPU accelerator itself; this only silences its warning.
[ "$GPUS" -gt 0 ] || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# The launcher's own log (its command lines, "exits with return code" after rank 0's error line)
# only with INRANK_DEBUG=1; inrank_megatron.launcher says the exit status.
if [ "${INRANK_DEBUG:-0}" != 0 ]; then log_level=info; else log_level=critical; fi

exec "$PYTHON" -m inrank_megatron.launcher run --name "$SCRIPT" -- \
  "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "$PORT" \
  --log_level "$log_level" ${DEEPSPEED_ARGS:-} --module "$TRAIN_MODULE" --config "$CONFIG" "${OVERRIDES[@]}"

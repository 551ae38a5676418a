#!/bin/bash
# Stop the cluster started by tests/slurm/start.sh: slurmctld and every slurmd by their pid files
# (and munged only if start.sh started it). Leaves /etc/slurm/slurm.conf and /etc/hosts alone.
#
#   tests/slurm/stop.sh                  # INRANK_SLURM_DIR as for start.sh (default /tmp/inrank-slurm)
#
# KEEP_MUNGE=1 leaves munged running (start.sh restarting the cluster). Always exits 0; safe to run when nothing is running.
S=${INRANK_SLURM_DIR:-/tmp/inrank-slurm}

gone() {  # wait up to 10 s for a pid to exit
  for _ in $(seq 20); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.5; done
  return 1
}

if [ -s "$S/slurmctld.pid" ] && kill -0 "$(cat "$S/slurmctld.pid")" 2>/dev/null; then
  timeout 10 scontrol shutdown >/dev/null 2>&1 || true   # asks slurmctld and every slurmd to exit
fi
pidfiles=("$S"/slurmd-*.pid "$S/slurmctld.pid")
[ -f "$S/munged.started" ] && [ -z "${KEEP_MUNGE:-}" ] && pidfiles+=(/run/munge/munged.pid)
for p in "${pidfiles[@]}"; do
  [ -s "$p" ] || continue
  pid=$(cat "$p")
  case $p in */munged.pid) kill "$pid" 2>/dev/null ;; esac
  gone "$pid" || { kill "$pid" 2>/dev/null; gone "$pid" || kill -9 "$pid" 2>/dev/null; }
  rm -f "$p"
done
[ -n "${KEEP_MUNGE:-}" ] || rm -f "$S/munged.started"
exit 0

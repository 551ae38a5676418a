#!/bin/bash
# Start a real Slurm 22.05 cluster (Debian slurm-wlm + munge) on this one host, for tests.
#
#   tests/slurm/start.sh [NNODES]        # as root; default NNODES=2
#
# NNODES > 1 fakes nodes n1..nN on this host: Debian builds Slurm with MULTIPLE_SLURMD, so each
# fake node is one `slurmd -N nX` on its own port, and n1..nN resolve to 127.0.0.1 through
# /etc/hosts. Each node gets max(1, cores / NNODES) CPUs, so two nodes on a 2-core host run one
# task each. Needs no systemd: munged, slurmctld and the slurmds are started by hand.
#
# Environment:
#   INRANK_SLURM_DIR   state, spool, logs and pid files (default /tmp/inrank-slurm)
#   APT_TIMEOUT        seconds allowed for each apt-get call when Slurm is missing (default 600)
#
# Idempotent: when the cluster this script wrote is already up with NNODES healthy nodes it only
# prints `sinfo`; any other state is stopped (tests/slurm/stop.sh) and started afresh.
# Exit status: 0 up; 3 Slurm or munge could not be installed (apt-get failed); 1 anything else.
# Stop with tests/slurm/stop.sh.
set -euo pipefail

case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
N=${1:-2}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "start.sh: NNODES must be a positive integer, got '$N'" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "start.sh: must run as root (starts munged, slurmctld, slurmd)" >&2; exit 1; }
HERE=$(cd "$(dirname "$0")" && pwd)
S=${INRANK_SLURM_DIR:-/tmp/inrank-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# Written by inrank-megatron tests/slurm/start.sh"

log() { echo "start.sh: $*" >&2; }

# --- install (Debian's postinst creates /etc/munge/munge.key) ---------------------------------
apt_install() {
  DEBIAN_FRONTEND=noninteractive timeout "${APT_TIMEOUT:-600}" \
    apt-get install -y -q --no-install-recommends slurm-wlm munge >"$S/apt.log" 2>&1
}
mkdir -p "$S"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  if ! apt_install; then
    timeout "${APT_TIMEOUT:-600}" apt-get update -q >>"$S/apt.log" 2>&1 || true
    apt_install || { log "apt-get install slurm-wlm munge failed: $(tail -n 1 "$S/apt.log")"; exit 3; }
  fi
fi

# --- munge ------------------------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge: /etc/munge/munge.key; }
mkdir -p /run/munge && chown munge: /run/munge
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
  touch "$S/munged.started"          # stop.sh stops munged only if we started it
fi
for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }

# --- configuration ----------------------------------------------------------------------------
HOST=$(hostname -s)
CORES=$(nproc)
CPUS=$(( CORES / N )); [ "$CPUS" -ge 1 ] || CPUS=1
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
if [ "$N" -gt 1 ]; then
  NODES="n[1-$N]"
  NODELINE="NodeName=$NODES NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-$((17000 + N)) CPUs=$CPUS RealMemory=$((MEM / N)) State=UNKNOWN"
else
  NODES=$HOST
  NODELINE="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CORES RealMemory=$MEM State=UNKNOWN"
fi
# AuthInfo=cred_expire=20: a requeued job may start again only once the revoked credential of its
# last run has expired (slurm.conf(5): 120 s by default), which was two idle minutes of the
# requeue test; 20 s is ample for a step launch on one host.
WANT=$(cat <<CONF_EOF
$MARK ($N nodes, state in $S)
ClusterName=inrank-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool/%n
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=3600
AuthInfo=cred_expire=20
$NODELINE
PartitionName=debug Nodes=$NODES Default=YES MaxTime=INFINITE State=UP
CONF_EOF
)

idle_nodes() { timeout 5 sinfo -h -t idle -o %D 2>/dev/null | awk '{s += $1} END {print s + 0}'; }

if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$WANT" ] && [ -s "$S/slurmctld.pid" ] \
   && kill -0 "$(cat "$S/slurmctld.pid")" 2>/dev/null \
   && [ "$(timeout 5 sinfo -h -o %D 2>/dev/null | awk '{s += $1} END {print s + 0}')" = "$N" ] \
   && ! timeout 5 sinfo -h -o %T 2>/dev/null | grep -qE 'down|drain|fail|unk'; then
  sinfo
  exit 0
fi

KEEP_MUNGE=1 "$HERE/stop.sh"
rm -rf "$S/state" "$S/spool" "$S/log"
mkdir -p "$S/state" "$S/log" /etc/slurm
for n in $(if [ "$N" -gt 1 ]; then seq -f 'n%g' 1 "$N"; else echo "$HOST"; fi); do mkdir -p "$S/spool/$n"; done
if [ -f "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
  cp "$CONF" "$S/slurm.conf.orig"; log "saved the existing $CONF as $S/slurm.conf.orig"
fi
printf '%s\n' "$WANT" > "$CONF"
if [ "$N" -gt 1 ]; then
  for i in $(seq "$N"); do
    grep -qE "[[:space:]]n$i([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 n$i" >> /etc/hosts
  done
fi

# --- daemons ----------------------------------------------------------------------------------
slurmctld -c                              # -c: clean state (no jobs carried over)
if [ "$N" -gt 1 ]; then for i in $(seq "$N"); do slurmd -N "n$i"; done; else slurmd; fi
deadline=$((SECONDS + 60))                # bounded: nodes register within seconds
while [ "$SECONDS" -lt "$deadline" ]; do
  if [ "$(idle_nodes)" = "$N" ]; then sinfo; exit 0; fi
  sleep 1
done
log "slurm did not come up with $N idle nodes within 60 s"
timeout 5 sinfo -N -l >&2 || true
tail -n 20 "$S"/log/*.log >&2 || true
exit 1

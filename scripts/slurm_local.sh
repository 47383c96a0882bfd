#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests and for trying `mlra-mega submit`.
#   bash scripts/slurm_local.sh start   # installs slurm-wlm, munge and tini if missing, starts them
#   bash scripts/slurm_local.sh stop    # stops only what start started (PID files)
#   export SLURM_CONF=$MLRA_SLURM_DIR/slurm.conf   (printed by start)
# Settings measured on Debian 12 / Slurm 22.05 (see slurm/README.md for why each is there).
set -euo pipefail
dir="${MLRA_SLURM_DIR:-/tmp/mlra-slurm}"
conf="$dir/slurm.conf"

start() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v tini >/dev/null; then
    echo "[slurm] installing slurm-wlm, munge, tini ..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge tini >/dev/null
  fi
  mkdir -p "$dir"/{state,spool,munge} /run/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 3 / 4 ))
  cat > "$conf" <<CONF
ClusterName=mlra-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10,socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem / cpus ))
EnforcePartLimits=ALL
SchedulerParameters=bf_interval=1,sched_interval=2
MinJobAge=5
ReturnToService=2
JobRequeue=1
KillWait=30
MpiDefault=none
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$conf"
  if [ ! -f "$dir/munged.pid" ] || ! kill -0 "$(cat "$dir/munged.pid")" 2>/dev/null; then
    munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
      --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"
  fi
  if [ ! -f "$dir/slurmctld.pid" ] || ! kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    # -c: a test cluster starts empty. Jobs recorded by an earlier run that was killed would
    # otherwise be recovered as running and hold the node until their time limit.
    slurmctld -f "$conf" -c -i
  fi
  if [ ! -f "$dir/slurmd.pid" ] || ! kill -0 "$(cat "$dir/slurmd.pid")" 2>/dev/null; then
    # Under a reaper, so that jobs' processes are collected and jobs end promptly.
    setsid tini -s -- slurmd -f "$conf" -N localhost -D > "$dir/slurmd.out" 2>&1 &
    echo $! > "$dir/tini.pid"
  fi
  for _ in $(seq 1 50); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      echo "[slurm] up: export SLURM_CONF=$conf"
      return 0
    fi
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    sleep 0.2
  done
  echo "[slurm] the node did not come up; logs in $dir" >&2
  sinfo >&2 || true
  return 1
}

stop() {
  export SLURM_CONF="$conf"
  for name in tini slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  echo "[slurm] stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A real Slurm cluster on this machine, for the tests and for trying `mlra-mega submit`.
#   bash scripts/slurm_local.sh start             # installs slurm-wlm, munge and tini if missing,
#                                                 # starts node `localhost` (partition debug)
#   bash scripts/slurm_local.sh start --nodes 2   # and nodes node1 + node2 (partition multi), each
#                                                 # in its own network namespace, on one bridge
#   bash scripts/slurm_local.sh node-down 2       # node2 fails: its network link is cut
#   bash scripts/slurm_local.sh node-up 2         # node2 is back: link up, slurmd running
#   bash scripts/slurm_local.sh stop              # stops and removes only what start made
#   export SLURM_CONF=$MLRA_SLURM_DIR/slurm.conf   (printed by start)
# Settings measured on Debian 12 / Slurm 22.05 (see slurm/README.md for why each is there).
set -euo pipefail
dir="${MLRA_SLURM_DIR:-/tmp/mlra-slurm}"
conf="$dir/slurm.conf"
# The two-node part: a bridge here (the controller's side) and one namespace per node. Traffic
# stays on these addresses and on loopback.
bridge=mlra-br0
net=10.77.0
ctl_addr=$net.1
hosts_mark="# mlra-slurm-local"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_conf() {  # $1: 1 or 2 (nodes besides localhost: none, or node1 and node2)
  local cpus mem ctl nodes=""
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 3 / 4 ))
  ctl=localhost
  if [ "$1" = 2 ]; then
    # The nodes reach the controller on the bridge; localhost would be their own loopback.
    ctl="localhost($ctl_addr)"
    nodes="NodeName=node1 NodeAddr=$net.11 CPUs=$cpus RealMemory=$(( mem / 2 )) State=UNKNOWN
NodeName=node2 NodeAddr=$net.12 CPUs=$cpus RealMemory=$(( mem / 2 )) State=UNKNOWN
PartitionName=multi Nodes=node1,node2 MaxTime=INFINITE State=UP"
  fi
  cat > "$conf.new" <<CONF
ClusterName=mlra-local
SlurmctldHost=$ctl
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10,socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( mem / cpus / 2 ))
EnforcePartLimits=ALL
SchedulerParameters=bf_interval=1,sched_interval=2
MinJobAge=5
ReturnToService=2
JobRequeue=1
KillWait=30
MpiDefault=none
SlurmdTimeout=20
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
$nodes
CONF
}

node_ns() { echo "mlra-node$1"; }

node_up() {  # node $1: its namespace, link and address (once), and its slurmd
  local i=$1 ns
  ns=$(node_ns "$i")
  if ! ip netns list | grep -qw "$ns"; then
    ip netns add "$ns"
    ip link add "mlra-veth$i" type veth peer name eth0 netns "$ns"
    ip link set "mlra-veth$i" master "$bridge" up
    ip -n "$ns" addr add "$net.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  fi
  ip link set "mlra-veth$i" up
  mkdir -p "$dir/spool-node$i"
  if ! alive "$dir/slurmd-node$i.pid"; then
    rm -f "$dir/slurmd-node$i.pid"
    # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no cgroup mount.
    # unshare --uts: the node and its tasks have their own hostname.
    setsid nsenter --net="/var/run/netns/$ns" unshare --uts sh -c \
      "hostname node$i && exec tini -s -- slurmd -f '$conf' -N node$i -D" >> "$dir/slurmd-node$i.out" 2>&1 &
    echo $! > "$dir/tini-node$i.pid"
    for _ in $(seq 1 100); do [ -s "$dir/slurmd-node$i.pid" ] && break; sleep 0.1; done
  fi
}

node_down() {  # node $1 fails as a node does: nothing from it arrives any more. Its processes
  # live on, cut off (killing them would close their sockets, and the other node's tasks would
  # see a peer exit instead of a silent node); once the link is back, slurmd ends what is stale.
  ip link set "mlra-veth$1" down
}

node_kill() {  # everything in node $1's namespace (slurmd, slurmstepd, tasks) killed at once
  local ns
  ns=$(node_ns "$1")
  # shellcheck disable=SC2046
  kill -9 $(ip netns pids "$ns" 2>/dev/null) 2>/dev/null || true
  rm -f "$dir/slurmd-node$1.pid" "$dir/tini-node$1.pid"
}

wait_nodes() {  # until every node named is idle/mixed/allocated
  for _ in $(seq 1 150); do
    local ok=1 node
    for node in "$@"; do
      sinfo -h -n "$node" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' || ok=0
    done
    [ $ok = 1 ] && return 0
    for node in "$@"; do scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true; done
    sleep 0.2
  done
  echo "[slurm] node(s) $* did not come up; logs in $dir" >&2
  sinfo >&2 || true
  return 1
}

start() {
  local n=1
  if [ "${1:-}" = --nodes ]; then n=${2:?--nodes needs 1 or 2}; fi
  [ "$n" = 1 ] || [ "$n" = 2 ] || { echo "usage: $0 start [--nodes 1|2]" >&2; exit 2; }
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v tini >/dev/null; then
    echo "[slurm] installing slurm-wlm, munge, tini ..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge tini >/dev/null
  fi
  mkdir -p "$dir"/{state,spool-localhost,munge} /run/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
  # A running two-node cluster serves a one-node start as it is.
  if [ "$n" = 1 ] && alive "$dir/slurmctld.pid" && grep -q '^NodeName=node1' "$conf" 2>/dev/null; then n=2; fi
  write_conf "$n"
  export SLURM_CONF="$conf"
  if [ -f "$conf" ] && ! cmp -s "$conf" "$conf.new" && alive "$dir/slurmctld.pid"; then
    echo "[slurm] restarting the controller and localhost's slurmd for the new node list"
    for name in slurmctld tini slurmd-localhost; do
      if alive "$dir/$name.pid"; then kill "$(cat "$dir/$name.pid")"; fi
    done
    for _ in $(seq 1 100); do alive "$dir/slurmctld.pid" || alive "$dir/slurmd-localhost.pid" || break; sleep 0.1; done
    rm -f "$dir/slurmctld.pid" "$dir/slurmd-localhost.pid" "$dir/tini.pid"
  fi
  mv "$conf.new" "$conf"
  if [ "$n" = 2 ]; then
    if ! ip link show "$bridge" >/dev/null 2>&1; then
      ip link add "$bridge" type bridge
      ip addr add "$ctl_addr/24" dev "$bridge"
      ip link set "$bridge" up
    fi
    if ! grep -q "$hosts_mark" /etc/hosts; then
      # The rendezvous host is the first node's name: every namespace resolves it here.
      printf '%s\n' "$net.11 node1 $hosts_mark" "$net.12 node2 $hosts_mark" >> /etc/hosts
    fi
  fi
  if ! alive "$dir/munged.pid"; then
    munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
      --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"
  fi
  if ! alive "$dir/slurmctld.pid"; then
    # -c: a test cluster starts empty. Jobs recorded by an earlier run that was killed would
    # otherwise be recovered as running and hold the node until their time limit.
    slurmctld -f "$conf" -c -i
  fi
  if ! alive "$dir/slurmd-localhost.pid"; then
    # Under a reaper, so that jobs' processes are collected and jobs end promptly.
    setsid tini -s -- slurmd -f "$conf" -N localhost -D > "$dir/slurmd.out" 2>&1 &
    echo $! > "$dir/tini.pid"
  fi
  if [ "$n" = 2 ]; then
    node_up 1
    node_up 2
    wait_nodes localhost node1 node2
  else
    wait_nodes localhost
  fi
  echo "[slurm] up ($n node set): export SLURM_CONF=$conf"
}

stop() {
  export SLURM_CONF="$conf"
  local i
  for i in 1 2; do
    node_kill "$i"
    if ip netns list 2>/dev/null | grep -qw "$(node_ns "$i")"; then ip netns del "$(node_ns "$i")"; fi
    ip link del "mlra-veth$i" 2>/dev/null || true  # gone with its namespace, unless that failed
  done
  if ip link show "$bridge" >/dev/null 2>&1; then ip link del "$bridge"; fi
  if grep -q "$hosts_mark" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount: rewrite it in place rather than replace it.
    grep -v "$hosts_mark" /etc/hosts > "$dir/hosts.kept" || true
    cat "$dir/hosts.kept" > /etc/hosts
    rm -f "$dir/hosts.kept"
  fi
  for name in tini slurmd-localhost slurmctld munged; do
    pidfile="$dir/$name.pid"
    if [ -f "$pidfile" ]; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  echo "[slurm] stopped"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  node-down) node_down "${2:?node-down needs 1 or 2}" ;;
  node-up) export SLURM_CONF="$conf"; node_up "${2:?node-up needs 1 or 2}"; wait_nodes "node$2" ;;
  stop) stop ;;
  *) echo "usage: $0 start [--nodes 2] | node-down N | node-up N | stop" >&2; exit 2 ;;
esac

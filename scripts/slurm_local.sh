#!/usr/bin/env bash
# Real Slurm clusters on this machine, for the tests and for trying `mlra-mega submit`.
#   bash scripts/slurm_local.sh start            # one node, `localhost`; installs slurm-wlm, munge
#                                                # and tini if missing
#   bash scripts/slurm_local.sh start --nodes 2  # a second cluster beside it: node1 and node2,
#                                                # each in its own network namespace, on a bridge
#   bash scripts/slurm_local.sh node-down 2      # node2 fails: its network link is cut
#   bash scripts/slurm_local.sh node-up 2        # node2 is back: link up, slurmd running
#   bash scripts/slurm_local.sh stop [--nodes 2] # stops and removes what start made (both, or the
#                                                # two-node cluster only)
#   export SLURM_CONF=...                        # printed by start: one file per cluster
# Settings measured on Debian 12 / Slurm 22.05 (see slurm/README.md for why each is there).
set -euo pipefail
dir="${MLRA_SLURM_DIR:-/tmp/mlra-slurm}"
conf="$dir/slurm.conf"

common() {  # Slurm installed, and munge (shared by both clusters) running
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v tini >/dev/null \
     || ! command -v ip >/dev/null; then
    echo "[slurm] installing slurm-wlm, munge, tini, iproute2 ..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge tini iproute2 >/dev/null
  fi
  mkdir -p "$dir"/{state,spool,munge} /run/munge
  [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chmod 400 /etc/munge/munge.key; }
  if [ ! -f "$dir/munged.pid" ] || ! kill -0 "$(cat "$dir/munged.pid")" 2>/dev/null; then
    munged --force --socket="$dir/munge/munge.socket" --pid-file="$dir/munged.pid" \
      --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"
  fi
}

start() {
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

end_daemon() {  # the daemon of PID file $1 ended (TERM, then KILL after 10 s) and its file gone
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  if kill "$pid" 2>/dev/null; then
    # slurmctld saves its state before it exits: the next start must not find it still running.
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

stop() {
  export SLURM_CONF="$conf"
  for name in tini slurmd slurmctld munged; do
    end_daemon "$dir/$name.pid"
  done
  echo "[slurm] stopped"
}

# The two-node cluster. Slurm 22.05 refuses one config holding `localhost` and the two nodes
# ("Duplicated NodeHostName"), so it is a cluster of its own: its own config, state and
# controller port, sharing munge. A bridge here (the controller's side) and one network namespace
# per node; traffic stays on these addresses and on loopback.
dir2="$dir/two-nodes"
conf2="$dir2/slurm.conf"
bridge=mlra-br0
net=10.77.0
ctl_addr=$net.1
hosts_mark="# mlra-slurm-local"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_ns() { echo "mlra-node$1"; }

write_conf2() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 3 / 8 ))
  cat > "$conf2" <<CONF
ClusterName=mlra-local2
SlurmctldHost=localhost($ctl_addr)
SlurmctldPort=6827
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10,socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir2/state
SlurmdSpoolDir=$dir2/spool-%n
SlurmctldPidFile=$dir2/slurmctld.pid
SlurmdPidFile=$dir2/slurmd-%n.pid
SlurmctldLogFile=$dir2/slurmctld.log
SlurmdLogFile=$dir2/slurmd-%n.log
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
# The survivors of a node failure hang in a collective: TERM cannot stop them, KILL follows it
# after KillWait (10 s: under 10 the survivors of a killed task are killed before they can name
# it). A dead node is marked down SlurmdTimeout after its last answer.
KillWait=10
MpiDefault=none
SlurmdTimeout=10
NodeName=node1 NodeAddr=$net.11 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=node2 NodeAddr=$net.12 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=multi Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF
}

node_up() {  # node $1: its namespace, link and address (once), and its slurmd
  local i=$1 ns
  ns=$(node_ns "$i")
  if ! ip netns list | grep -qw "$ns"; then
    ip netns add "$ns"
    ip link add "mlra-veth$i" type veth peer name eth0 netns "$ns"
    ip link set "mlra-veth$i" master "$bridge"
    ip -n "$ns" addr add "$net.1$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  fi
  ip link set "mlra-veth$i" up
  mkdir -p "$dir2/spool-node$i"
  if ! alive "$dir2/slurmd-node$i.pid"; then
    rm -f "$dir2/slurmd-node$i.pid"
    # nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no cgroup mount.
    # unshare --uts: the node and its tasks have their own hostname.
    setsid nsenter --net="/var/run/netns/$ns" unshare --uts sh -c \
      "hostname node$i && exec tini -s -- slurmd -f '$conf2' -N node$i -D" >> "$dir2/slurmd-node$i.out" 2>&1 &
    echo $! > "$dir2/tini-node$i.pid"
    for _ in $(seq 1 100); do [ -s "$dir2/slurmd-node$i.pid" ] && break; sleep 0.1; done
  fi
}

node_down() {  # node $1 fails as a node does: nothing from it arrives any more. Its processes
  # live on, cut off (killing them would close their sockets, and the other node's tasks would
  # see a peer exit instead of a silent node); once the link is back, slurmd ends what is stale.
  ip link set "mlra-veth$1" down
}

wait_nodes() {  # until every node named is idle/mixed/allocated
  local node ok
  for _ in $(seq 1 150); do
    ok=1
    for node in "$@"; do
      sinfo -h -n "$node" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' || ok=0
    done
    [ $ok = 1 ] && return 0
    for node in "$@"; do scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true; done
    sleep 0.2
  done
  echo "[slurm] node(s) $* did not come up; logs in $dir2" >&2
  sinfo >&2 || true
  return 1
}

start2() {
  mkdir -p "$dir2/state"
  write_conf2
  export SLURM_CONF="$conf2"
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    ip addr add "$ctl_addr/24" dev "$bridge"
    ip link set "$bridge" up
  fi
  if ! grep -q "$hosts_mark" /etc/hosts; then
    # The rendezvous host is the first node's name: every namespace resolves it here.
    printf '%s\n' "$net.11 node1 $hosts_mark" "$net.12 node2 $hosts_mark" >> /etc/hosts
  fi
  if ! alive "$dir2/slurmctld.pid"; then
    slurmctld -f "$conf2" -c -i
  fi
  node_up 1
  node_up 2
  wait_nodes node1 node2
  echo "[slurm] two nodes up: export SLURM_CONF=$conf2"
}

stop2() {
  local i ns pids
  for i in 1 2; do
    ns=$(node_ns "$i")
    # Everything in the node's namespace (slurmd, slurmstepd, tasks) at once.
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    rm -f "$dir2/slurmd-node$i.pid" "$dir2/tini-node$i.pid"
    if ip netns list 2>/dev/null | grep -qw "$ns"; then ip netns del "$ns"; fi
    ip link del "mlra-veth$i" 2>/dev/null || true  # gone with its namespace, unless that failed
  done
  if ip link show "$bridge" >/dev/null 2>&1; then ip link del "$bridge"; fi
  if grep -q "$hosts_mark" /etc/hosts 2>/dev/null; then
    # /etc/hosts may be a bind mount: rewrite it in place rather than replace it.
    grep -v "$hosts_mark" /etc/hosts > "$dir2/hosts.kept" || true
    cat "$dir2/hosts.kept" > /etc/hosts
    rm -f "$dir2/hosts.kept"
  fi
  end_daemon "$dir2/slurmctld.pid"
}

case "${1:-}" in
  start)
    if [ "${2:-}" = --nodes ] && [ "${3:-}" = 2 ]; then common; start2
    elif [ -z "${2:-}" ]; then common; start
    else echo "usage: $0 start [--nodes 2]" >&2; exit 2; fi ;;
  node-down) node_down "${2:?node-down needs 1 or 2}" ;;
  node-up) export SLURM_CONF="$conf2"; node_up "${2:?node-up needs 1 or 2}"; wait_nodes "node$2" ;;
  stop)
    if [ "${2:-}" = --nodes ] && [ "${3:-}" = 2 ]; then stop2; echo "[slurm] two-node cluster stopped"
    else stop2; stop; fi ;;
  *) echo "usage: $0 start [--nodes 2] | node-down N | node-up N | stop [--nodes 2]" >&2; exit 2 ;;
esac

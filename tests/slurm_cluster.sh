#!/usr/bin/env bash
# The test suite's own Slurm cluster (tests/slurm.py starts it once per session): slurmctld in the root
# network namespace, one slurmd per node, each node in its own network + UTS namespace (own address and
# hostname) on a bridge, all sharing this machine's filesystem as a cluster shares /home over NFS.
#
#   slurm_cluster.sh up [NODES] [CPUS_PER_NODE]   start; prints `sinfo`
#   slurm_cluster.sh down                          stop everything `up` started
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge. Names, subnet and ports differ from
# ../shared/slurm/cluster.sh so both can run at once. What it took to get right on these machines:
# - SlurmctldHost names this machine's real hostname, with the bridge address in parentheses.
# - Every node name resolves on every node (srun forwards by name): entries go into /etc/hosts.
# - dockerd sets the iptables FORWARD policy to DROP, which drops bridged traffic between the nodes too:
#   an ACCEPT rule for the bridge is added (and removed by `down`).
# - slurmd initialises the cgroup plugin even with task/none: cgroup.conf pins cgroup/v1.
# - munged runs once on the machine: started here only if none is running (and then stopped by `down`).
set -euo pipefail
NET=${DSTACK_TEST_SLURM_NET:-10.203.0}
BR=dstkslbr0
NS=dstksl # namespaces, node names and hostnames: dstksl1, dstksl2, ...
RUN=${DSTACK_TEST_SLURM_RUN:-/run/dstack-test-slurm}
CONF=$RUN/slurm.conf

up() {
  local nodes=${1:-2} cpus=${2:-2} n host nodelines="" names=""
  host=$(hostname)
  mkdir -p "$RUN/spool" "$RUN/ctld" /run/munge
  chown munge:munge /run/munge 2>/dev/null || true
  if ! pgrep -x munged >/dev/null; then
    rm -f /run/munge/munge.socket.2.lock
    munged --force --pid-file="$RUN/munged.pid"
  fi
  for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
  [ -S /run/munge/munge.socket.2 ] || { echo "munged did not start" >&2; return 1; }
  ip link show "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge
  ip addr show dev "$BR" | grep -q "$NET.1/" || ip addr add "$NET.1/24" dev "$BR"
  ip link set "$BR" up
  iptables -C FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null || iptables -I FORWARD -i "$BR" -o "$BR" -j ACCEPT
  for n in $(seq 1 "$nodes"); do
    ip netns add "$NS$n" 2>/dev/null || true
    if ! ip link show "${NS}v$n" >/dev/null 2>&1; then
      ip link add "${NS}v$n" type veth peer name "${NS}p$n"
      ip link set "${NS}p$n" netns "$NS$n"
    fi
    ip link set "${NS}v$n" master "$BR"
    ip link set "${NS}v$n" up
    ip netns exec "$NS$n" ip addr show dev "${NS}p$n" | grep -q "$NET.1$n/" ||
      ip netns exec "$NS$n" ip addr add "$NET.1$n/24" dev "${NS}p$n"
    ip netns exec "$NS$n" ip link set "${NS}p$n" up
    ip netns exec "$NS$n" ip link set lo up
    ip netns exec "$NS$n" ip route replace default via "$NET.1"
    grep -q " $NS$n\$" /etc/hosts || echo "$NET.1$n $NS$n" >>/etc/hosts
    nodelines+="NodeName=$NS$n NodeAddr=$NET.1$n CPUs=$cpus RealMemory=2000 State=UNKNOWN"$'\n'
    names+="${names:+,}$NS$n"
  done
  cat >"$CONF" <<EOF
ClusterName=dstackfixture
SlurmctldHost=$host($NET.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$RUN/ctld
SlurmdSpoolDir=$RUN/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$RUN/slurmctld.log
SlurmdLogFile=$RUN/slurmd-%n.log
PlugStackConfig=$RUN/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
KillWait=2
InactiveLimit=0
${nodelines}PartitionName=main Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF
  : >"$RUN/plugstack.conf"
  printf 'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=yes\n' >"$RUN/cgroup.conf"
  { [ -s "$RUN/slurmctld.pid" ] && kill -0 "$(cat "$RUN/slurmctld.pid")" 2>/dev/null; } || slurmctld -f "$CONF"
  for n in $(seq 1 "$nodes"); do
    mkdir -p "$RUN/spool/$NS$n"
    if ! { [ -s "$RUN/slurmd-$NS$n.pid" ] && kill -0 "$(cat "$RUN/slurmd-$NS$n.pid")" 2>/dev/null; }; then
      ip netns exec "$NS$n" unshare --uts sh -c "hostname $NS$n && exec slurmd -f '$CONF' -N $NS$n"
    fi
  done
  echo "$nodes" >"$RUN/nodes"
  export SLURM_CONF=$CONF
  local deadline=$((SECONDS + 45))
  until timeout 5 sinfo -h -o '%D %T' 2>/dev/null | grep -q "^$nodes idle"; do
    if ((SECONDS > deadline)); then
      timeout 5 sinfo
      tail -n 20 "$RUN"/*.log
      return 1
    fi
    sleep 0.2
  done
  sinfo
}

down() {
  local n nodes f
  nodes=$(cat "$RUN/nodes" 2>/dev/null || echo 2)
  local pids=""
  for f in "$RUN"/slurmd-*.pid "$RUN/slurmctld.pid" "$RUN/munged.pid"; do
    [ -s "$f" ] && pids+=" $(cat "$f")"
  done
  # shellcheck disable=SC2086
  [ -n "$pids" ] && kill $pids 2>/dev/null
  for i in $(seq 100); do # the pids, not the pid files: a daemon removes its file before it is gone
    alive=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive+=" $pid"; done
    [ -z "$alive" ] && break
    # shellcheck disable=SC2086
    [ "$i" -gt 50 ] && kill -9 $alive 2>/dev/null
    sleep 0.1
  done
  for n in $(seq 1 "$nodes"); do
    for pid in $(ip netns pids "$NS$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$NS$n" 2>/dev/null || true
    ip link del "${NS}v$n" 2>/dev/null || true
    sed -i "/ $NS$n\$/d" /etc/hosts
  done
  iptables -D FORWARD -i "$BR" -o "$BR" -j ACCEPT 2>/dev/null || true
  ip link del "$BR" 2>/dev/null || true
  rm -rf "$RUN"
}

case "${1:-}" in
up) shift; up "$@" ;;
down) down ;;
*) sed -n '2,8p' "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# A throwaway Slurm on this host for the tests: munged, slurmctld and two slurmd ("node1",
# "node2", both 127.0.0.1 on different ports), config and state in DIR. Needs root and
# Debian's slurmctld slurmd slurm-client munge (.ci/run installs them).
#
#   tests/slurm_cluster.sh start DIR    # prints SLURM_CONF=DIR/slurm.conf when both nodes are idle
#   tests/slurm_cluster.sh stop DIR
set -euo pipefail
action=$1
dir=$(realpath -m "$2")

stop() {  # and wait until they are gone (a daemon still exiting holds the ports the next start needs)
  pids=()
  for pidfile in "$dir"/slurmd-node*.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
    [ -f "$pidfile" ] && pids+=("$(cat "$pidfile")") && kill "${pids[-1]}" 2>/dev/null || true
  done
  for _ in $(seq 1 100); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return 0
    sleep 0.1
  done
}

if [ "$action" = stop ]; then
  stop
  exit 0
fi

mkdir -p "$dir"/state "$dir"/spool "$dir"/log
cpus=$(OMP_NUM_THREADS='' nproc)  # (nproc honours OMP_NUM_THREADS, which the tests set to 1)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
port=${SLURM_TEST_PORT:-16817}
host=$(hostname -s)

dd if=/dev/urandom of="$dir/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge.key"
/usr/sbin/munged --force --key-file="$dir/munge.key" --socket="$dir/munge.sock" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge.seed"

cat > "$dir/slurm.conf" <<EOF
ClusterName=bigantest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
AuthType=auth/munge
AuthInfo=socket=$dir/munge.sock,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SwitchType=switch/none
MinJobAge=600
NodeName=node1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=$cpus RealMemory=$memory State=UNKNOWN
NodeName=node2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF

export SLURM_CONF=$dir/slurm.conf
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N node1
slurmd -f "$SLURM_CONF" -N node2
for _ in $(seq 1 60); do
  if [ "$(sinfo -h -o '%t' | sort -u | tr -d '\n')" = idle ]; then
    echo "SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "slurm did not come up; logs in $dir/log" >&2
stop
exit 1

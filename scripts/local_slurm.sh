#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine, for tests: one slurmctld and four
# `slurmd -N ciN` virtual nodes on 127.0.0.1 (a heterogeneous job needs its own node per
# component), munge for authentication. Everything it writes lives in DIR.
#
#   bash scripts/local_slurm.sh start DIR   # installs Debian's packages if missing (root)
#   export SLURM_CONF=DIR/slurm.conf        # then sbatch / srun / scontrol talk to it
#   bash scripts/local_slurm.sh stop DIR    # cancels jobs, stops every daemon it started
#
# `start` exits 3 when it cannot run here (not root, or the packages cannot be installed).
set -euo pipefail
cmd=${1:?usage: local_slurm.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: local_slurm.sh start|stop DIR}")
NODES=(ci1 ci2 ci3 ci4)
CPUS_PER_NODE=${LOCAL_SLURM_CPUS:-4}

free_port() { "${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || { echo "local_slurm: needs root to install slurmctld/slurmd/munge" >&2; exit 3; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmctld slurmd slurm-client munge >"$dir/apt.log" 2>&1 \
    || { apt-get update -q >>"$dir/apt.log" 2>&1 && apt-get install -y -q slurmctld slurmd slurm-client munge >>"$dir/apt.log" 2>&1; } \
    || { echo "local_slurm: apt-get could not install the Slurm packages (see $dir/apt.log)" >&2; exit 3; }
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none; }
  chown munge:munge /etc/munge /etc/munge/munge.key && chmod 700 /etc/munge && chmod 600 /etc/munge/munge.key
  mkdir -p /run/munge /var/lib/munge /var/log/munge && chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- munged
  touch "$dir/munged.ours"  # stop only a munged this script started
}

write_conf() {
  local ctld_port nodes=""
  ctld_port=$(free_port)
  for node in "${NODES[@]}"; do
    nodes+="NodeName=$node NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$CPUS_PER_NODE State=UNKNOWN"$'\n'
  done
  mkdir -p "$dir/state"
  cat >"$dir/slurm.conf" <<EOF
ClusterName=streamrl-ci
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=10
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdSpoolDir=$dir/slurmd-%n
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmdLogFile=$dir/slurmd-%n.log
${nodes}PartitionName=ci Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_for_nodes() {
  for _ in $(seq 100); do
    if [ "$(SLURM_CONF=$dir/slurm.conf sinfo -h -t idle -o '%D' 2>/dev/null | head -1)" = "${#NODES[@]}" ]; then return 0; fi
    sleep 0.2
  done
  echo "local_slurm: nodes did not become idle; see $dir/*.log" >&2
  SLURM_CONF=$dir/slurm.conf sinfo >&2 || true
  exit 1
}

start() {
  mkdir -p "$dir"
  install_packages
  for node in "${NODES[@]}"; do grep -qw "$node" /etc/hosts || echo "127.0.0.1 $node" >>/etc/hosts; done  # append only
  start_munge
  write_conf
  slurmctld -f "$dir/slurm.conf"
  for node in "${NODES[@]}"; do slurmd -f "$dir/slurm.conf" -N "$node"; done
  wait_for_nodes
  echo "local_slurm: ${#NODES[@]} nodes up; export SLURM_CONF=$dir/slurm.conf"
}

stop_pids() {  # SIGTERM to every daemon named by these pid files at once, SIGKILL to any left after 5 s
  local pids=() pid
  for file in "$@"; do [ -f "$file" ] && pids+=("$(cat "$file")"); done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && break; pid=; done
    [ -z "$pid" ] && return 0
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

stop() {
  if [ -f "$dir/slurm.conf" ]; then
    SLURM_CONF=$dir/slurm.conf scancel --quiet --state=RUNNING,PENDING --full "--user=$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(SLURM_CONF=$dir/slurm.conf squeue -h 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
  stop_pids "$dir"/slurmd-*.pid "$dir/slurmctld.pid"
  if [ -f "$dir/munged.ours" ]; then stop_pids /run/munge/munged.pid; rm -f "$dir/munged.ours"; fi
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: local_slurm.sh start|stop DIR" >&2; exit 2 ;;
esac

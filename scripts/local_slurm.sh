#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for testing `compare.py --launcher slurm` against a real SLURM:
#   scripts/local_slurm.sh start    install slurm-wlm and munge if missing (Debian, as root), write
#                                   /etc/slurm/slurm.conf for this machine's cores and memory, start munged,
#                                   slurmctld and slurmd on localhost, wait until the node is idle
#   scripts/local_slurm.sh stop     cancel its jobs, stop the daemons it started, remove its slurm.conf
#   scripts/local_slurm.sh status   sinfo of the running cluster
# A slurm.conf this script did not write is never overwritten: on a machine that is part of a real cluster,
# use that cluster instead.
set -euo pipefail
conf=/etc/slurm/slurm.conf
marker="# written by scripts/local_slurm.sh"
state=/var/lib/local-slurm
logs=/var/log/local-slurm
run=/run/local-slurm

die() { echo "local_slurm: $*" >&2; exit 1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
      && command -v sbatch >/dev/null; then
    return
  fi
  [[ $EUID -eq 0 ]] || die "slurm-wlm and munge are missing; run as root to install them (apt-get)"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and this is not a Debian-like system"
  echo "[slurm] installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq </dev/null
  apt-get install -y -qq slurm-wlm munge </dev/null >/dev/null
}

write_conf() {
  if [[ -f $conf ]] && ! grep -qxF "$marker" "$conf"; then
    die "$conf exists and was not written by this script; use that cluster (or move the file away)"
  fi
  local node host
  host="$(hostname -s)"
  # slurmd -C prints this machine's cores, sockets and memory as a NodeName line
  node="$(slurmd -C | head -n 1) NodeAddr=127.0.0.1 State=UNKNOWN"
  mkdir -p /etc/slurm "$state/ctld" "$state/d" "$logs" "$run"
  cat > "$conf" <<EOF
$marker
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it starts again (120 by default; a job started sooner on the
# same node is killed with "Job credential revoked")
AuthInfo=cred_expire=15
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
KillWait=20
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$logs/slurmctld.log
SlurmdLogFile=$logs/slurmd.log
$node
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  echo "[slurm] wrote $conf: $node"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  [[ -f /etc/munge/munge.key ]] || { mungekey --create >/dev/null; chown munge:munge /etc/munge/munge.key; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$run/munged-started-here"
  for _ in $(seq 20); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.5
  done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

wait_idle() {
  local node deadline=$((SECONDS + 60)) status=""
  node="$(hostname -s)"
  while ((SECONDS < deadline)); do
    status="$(sinfo -h -n "$node" -o %t 2>/dev/null || true)"
    case "$status" in
      idle*|mix*|alloc*) echo "[slurm] node $node is $status; partition 'local' takes jobs"; return ;;
      drain*|down*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  die "node $node is not idle after 60 s (state: ${status:-none}); see $logs/slurmctld.log and $logs/slurmd.log"
}

daemon_running() { [[ -f $run/$1.pid ]] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

start() {
  install_packages
  [[ $EUID -eq 0 ]] || die "starting the daemons needs root"
  write_conf
  start_munge
  daemon_running slurmctld || /usr/sbin/slurmctld -i
  daemon_running slurmd || /usr/sbin/slurmd
  wait_idle
}

stop() {
  [[ -f $conf ]] && grep -qxF "$marker" "$conf" || { echo "[slurm] no local cluster of this script running"; return; }
  scancel --full --user="$(id -un)" 2>/dev/null || true
  for daemon in slurmd slurmctld; do
    if daemon_running "$daemon"; then
      local pid
      pid="$(cat "$run/$daemon.pid")"
      kill "$pid"
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
  done
  if [[ -f $run/munged-started-here ]]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    rm -f "$run/munged-started-here"
  fi
  rm -f "$conf"
  echo "[slurm] local cluster stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: scripts/local_slurm.sh {start|stop|status}" >&2; exit 2 ;;
esac

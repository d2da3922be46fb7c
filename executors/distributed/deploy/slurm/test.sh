#!/usr/bin/env bash
# End-to-end test of the Slurm deployment on this one machine (Debian, as
# root): installs slurm-wlm and munge with apt if missing, starts munged,
# slurmctld and slurmd for a one-node cluster on localhost, submits
# rask.sbatch running the seed tour (examples/futures_tour.rs) through
# rask-slurm, checks its output, and stops every daemon it started. Bounded:
# the job gets 5 minutes, the whole script 15 at most (apt included).
#
#   bash executors/distributed/deploy/slurm/test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../../.." && pwd)
cd "$repo"
started=$(date +%s)
step() { printf '==> [%ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }

[ "$(id -u)" = 0 ] || { echo "run as root: it installs and starts daemons" >&2; exit 2; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  step "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  timeout 600 apt-get update -qq
  timeout 600 apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

step "building rask-scheduler and the seed tour"
cargo build -q -p rask-distributed --bin rask-scheduler
cargo build -q --example futures_tour

work=$(mktemp -d /tmp/rask-slurm-test.XXXXXX)
chmod 755 "$work"
conf=$work/slurm.conf
node=$(hostname -s)
pids=()
cleanup() {
  step "stopping the daemons"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

step "munge: a throwaway key, munged"
# The key in a directory only munge reads; the socket where all may.
mkdir -p "$work/munge-key" "$work/munge"
chown munge:munge "$work/munge-key" "$work/munge"
chmod 700 "$work/munge-key"
chmod 755 "$work/munge"
dd if=/dev/urandom of="$work/munge-key/munge.key" bs=1024 count=1 status=none
chown munge:munge "$work/munge-key/munge.key"
chmod 400 "$work/munge-key/munge.key"
socket=$work/munge/munge.socket
runuser -u munge -- /usr/sbin/munged --key-file="$work/munge-key/munge.key" \
  --socket="$socket" --pid-file="$work/munge/munged.pid" --log-file="$work/munge/munged.log" \
  --seed-file="$work/munge/seed" --foreground &
pids+=($!)
for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
[ -S "$socket" ] || { echo "munged did not start"; cat "$work/munge/munged.log"; exit 1; }

step "slurm: a one-node cluster on $node"
mkdir -p "$work/ctld" "$work/d"
cat >"$conf" <<CONF
ClusterName=rasktest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=$work/ctld
SlurmdSpoolDir=$work/d
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=10 State=UP
CONF
export SLURM_CONF=$conf
slurmctld -D -f "$conf" >"$work/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$conf" >"$work/slurmd.out" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
  state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
  [ "$state" = idle ] && break
  sleep 0.2
done
if [ "$state" != idle ]; then
  echo "the node never became idle (state: ${state:-none})"
  tail -n 20 "$work"/*.log "$work"/*.out
  exit 1
fi
sinfo

step "submitting rask.sbatch with the seed tour"
out=$work/job.out
# Home of the job's token directory: a directory of this test.
timeout 300 env HOME="$work" \
  RASK_SLURM="$here/rask-slurm" \
  PROGRAM="$repo/target/debug/examples/futures_tour" \
  RASK_SCHEDULER_BIN="$repo/target/debug/rask-scheduler" \
  sbatch --wait --nodes=1 --cpus-per-task="$(nproc)" --time=5 --output="$out" \
  --chdir="$work" "$here/rask.sbatch" || { echo "the job failed:"; cat "$out"; exit 1; }
cat "$out"
grep -q "^rask: scheduler at tcp://" "$out" || { echo "no address printed"; exit 1; }
grep -q "^client on tcp://" "$out" || { echo "the tour did not run on the cluster"; exit 1; }
if find "$work/.rask" -name token 2>/dev/null | grep -q .; then
  echo "the token file was left behind"; exit 1
fi
if pgrep -f "$repo/target/debug/examples/futures_tour" >/dev/null; then
  echo "a worker is still running"; exit 1
fi
step "passed"

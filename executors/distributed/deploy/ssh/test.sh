#!/usr/bin/env bash
# End-to-end test of the SSH deployment on this one machine (Debian, as
# root): installs openssh-server if missing, makes a throwaway host key and
# client key, starts sshd on a free port of 127.0.0.1 (nothing of the
# system's SSH configuration is used or changed), runs the seed tour
# (examples/futures_tour.rs) through rask-ssh with a scheduler and two
# workers reached over SSH, checks its output and that the token never
# appeared on a command line, and stops sshd. Bounded: 10 minutes at most
# (apt included), the tour 2.
#
#   bash executors/distributed/deploy/ssh/test.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../../.." && pwd)
cd "$repo"
started=$(date +%s)
step() { printf '==> [%ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }

[ "$(id -u)" = 0 ] || { echo "run as root: it starts sshd" >&2; exit 2; }
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null; then
  step "installing openssh-server"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 300 apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null
fi

step "building rask-scheduler and the seed tour"
cargo build -q -p rask-distributed --bin rask-scheduler
cargo build -q --example futures_tour

work=$(mktemp -d /tmp/rask-ssh-test.XXXXXX)
sshd_pid=""
cleanup() {
  step "stopping sshd"
  [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null || true
  [ -n "$sshd_pid" ] && wait "$sshd_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

step "throwaway keys and an sshd on 127.0.0.1"
ssh-keygen -q -t ed25519 -N '' -f "$work/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$work/client_key"
cp "$work/client_key.pub" "$work/authorized_keys"
chmod 600 "$work/authorized_keys"
mkdir -p /run/sshd
chmod 755 "$work"
for _ in $(seq 20); do
  port=$(( 20000 + RANDOM % 20000 ))
  cat >"$work/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $port
HostKey $work/host_key
PidFile $work/sshd.pid
AuthorizedKeysFile $work/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AcceptEnv none
CONF
  /usr/sbin/sshd -D -e -f "$work/sshd_config" 2>"$work/sshd.log" &
  sshd_pid=$!
  for _ in $(seq 50); do
    grep -q "Server listening" "$work/sshd.log" && break
    kill -0 "$sshd_pid" 2>/dev/null || break
    sleep 0.1
  done
  grep -q "Server listening" "$work/sshd.log" && break
  wait "$sshd_pid" 2>/dev/null || true
  sshd_pid=""
done
[ -n "$sshd_pid" ] || { echo "sshd did not start"; cat "$work/sshd.log"; exit 1; }
export RASK_SSH_OPTS="-p $port -i $work/client_key -o StrictHostKeyChecking=no \
-o UserKnownHostsFile=$work/known_hosts -o LogLevel=ERROR"
# shellcheck disable=SC2086
ssh $RASK_SSH_OPTS -o BatchMode=yes 127.0.0.1 true

step "the seed tour through rask-ssh: a scheduler and two workers over SSH"
out=$work/tour.out
watch_ps() {
  # Every command line on the machine, while the tour runs: the token must
  # never be on one.
  while :; do ps -eo args >>"$work/ps.txt" 2>/dev/null || true; sleep 0.2; done
}
watch_ps &
watcher=$!
status=0
RASK_SCHEDULER_BIN="$repo/target/debug/rask-scheduler" timeout 120 \
  "$here/rask-ssh" 127.0.0.1,127.0.0.1,127.0.0.1 "$repo/target/debug/examples/futures_tour" \
  >"$out" 2>&1 || status=$?
kill "$watcher"; wait "$watcher" 2>/dev/null || true
cat "$out"
[ "$status" = 0 ] || { echo "rask-ssh failed ($status)"; cat "$work/sshd.log"; exit 1; }
grep -q "^rask: scheduler at tcp://.* 2 worker(s)" "$out" || { echo "no address printed"; exit 1; }
grep -q "^client on tcp://" "$out" || { echo "the tour did not run on the cluster"; exit 1; }
grep -q "ssh-127.0.0.1-1" "$work/ps.txt" || { echo "no named worker was seen running"; exit 1; }
if grep -q "RASK_TOKEN=[0-9a-f]" "$work/ps.txt"; then
  echo "the token appeared on a command line"; exit 1
fi
for _ in $(seq 50); do
  pgrep -f "$repo/target/debug/(rask-scheduler|examples/futures_tour)" >/dev/null || break
  sleep 0.2
done
if pgrep -af "$repo/target/debug/(rask-scheduler|examples/futures_tour)"; then
  echo "left running after rask-ssh ended"; exit 1
fi
step "passed"

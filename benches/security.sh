#!/bin/sh
# What authentication and TLS cost: `dist_map N` on a `rask-scheduler` and
# two worker processes on this machine, run R times in each of three modes,
# interleaved (insecure, token, tls+token, insecure, …), every run with a
# fresh scheduler, fresh workers and a fresh client process. Prints each
# run's JSON line on stderr and the median `us_per_task` of each mode.
#
#   sh benches/security.sh [N (10000)] [R (7)]
#
# Needs openssl (for a throwaway CA and a certificate naming 127.0.0.1).
set -eu
n=${1:-10000}
rounds=${2:-7}
cd "$(dirname "$0")/.."
cargo build --release --quiet -p rask-distributed --bin rask-scheduler
bench=$(cargo bench --bench workloads --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n 1)
[ -x "$bench" ] || { echo "no bench binary" >&2; exit 1; }
scheduler=target/release/rask-scheduler
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=rask-bench-ca -keyout "$tmp/ca.key" -out "$tmp/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$tmp/node.key" -out "$tmp/node.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' >"$tmp/ext"
openssl x509 -req -in "$tmp/node.csr" -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" \
    -CAcreateserial -days 1 -extfile "$tmp/ext" -out "$tmp/node.pem" 2>/dev/null
token=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')

# One run in mode $1; appends its us_per_task to $tmp/$1.
run() {
    mode=$1
    unset RASK_INSECURE RASK_TOKEN RASK_TLS_CA RASK_TLS_CERT RASK_TLS_KEY
    flags=""
    case $mode in
    insecure) export RASK_INSECURE=1; flags=--insecure ;;
    token) export RASK_TOKEN=$token ;;
    tls)
        export RASK_TOKEN=$token RASK_TLS_CA=$tmp/ca.pem
        export RASK_TLS_CERT=$tmp/node.pem RASK_TLS_KEY=$tmp/node.key
        flags="--tls-cert $tmp/node.pem --tls-key $tmp/node.key --tls-ca $tmp/ca.pem"
        ;;
    esac
    # shellcheck disable=SC2086
    "$scheduler" --port 0 $flags >"$tmp/address" 2>/dev/null &
    sched=$!
    while [ ! -s "$tmp/address" ]; do sleep 0.05; done
    address=$(head -n 1 "$tmp/address")
    workers=""
    for _ in 1 2; do
        RASK_WORKER=$address RASK_WORKER_THREADS=1 RASK_WORKER_DEATH_TIMEOUT=0 \
            "$bench" >/dev/null 2>&1 &
        workers="$workers $!"
    done
    line=$("$bench" dist_map "$n" --executor "$address" 2>/dev/null | tail -n 1)
    echo "$mode $line" >&2
    echo "$line" | sed -n 's/.*"us_per_task": *\([0-9.]*\).*/\1/p' >>"$tmp/$mode"
    # shellcheck disable=SC2086
    kill $sched $workers 2>/dev/null || true
    wait 2>/dev/null || true
    : >"$tmp/address"
}

i=0
while [ $i -lt "$rounds" ]; do
    for mode in insecure token tls; do run $mode; done
    i=$((i + 1))
done
for mode in insecure token tls; do
    median=$(sort -n "$tmp/$mode" | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    echo "dist_map $n, $mode: median $median us/task over $(wc -l <"$tmp/$mode") runs"
done

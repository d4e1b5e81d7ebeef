#!/usr/bin/env bash
# Macro benchmark: starts the all-in-one control plane (release build), holds
# N simulated agents with fleetplane-sim, pushes a config to all of them once
# they are connected, and reports:
#   - connections held and connect latency (p50/p99);
#   - config fan-out: time for the config to reach every agent (p50/p99 after
#     the first agent got it);
#   - gateway memory: the rise in resident memory divided by the agents held,
#     measured after hello, first status, the push, and a minute idle.
#
# Usage: benches/macro.sh [AGENTS ...]     (default: 10000)
# Loopback only; bounded in count and time; stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
counts=("${@:-10000}")
ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet --bin fleetplane -p fleetplane --bin fleetplane-sim -p fleetplane-loadtest
bin=target/release

for n in "${counts[@]}"; do
    data=$(mktemp -d)
    FLEETPLANE_DATA_DIR=$data FLEETPLANE_OPAMP_LISTEN=127.0.0.1:24320 FLEETPLANE_ADMIN_LISTEN=127.0.0.1:24321 \
    FLEETPLANE_DRAIN_MS=0 FLEETPLANE_MAX_CONNECTIONS=100000 RUST_LOG=warn \
        "$bin/fleetplane" > "$data/server.out" 2> "$data/server.err" &
    server=$!
    until grep -q "fleetplane ready" "$data/server.out" 2>/dev/null; do sleep 0.2; done
    rss_before=$(ps -o rss= -p "$server")
    idle=60
    connect=$(( n / 2000 + 10 ))
    duration=$(( connect + idle + 10 ))
    # Sample the server's memory after the connect phase, the push and a minute idle.
    ( sleep $(( connect + idle )); ps -o rss= -p "$server" > "$data/rss_after" ) &
    sampler=$!
    echo "== $n agents (all-in-one) =="
    "$bin/fleetplane-sim" --url ws://127.0.0.1:24320/v1/opamp --agents "$n" --duration-secs "$duration" \
        --heartbeat-secs 30 --source-ips 4 --connect-rate 5000 --push-config 127.0.0.1:24321
    wait "$sampler"
    rss_after=$(cat "$data/rss_after")
    awk -v a="$rss_after" -v b="$rss_before" -v n="$n" \
        'BEGIN { printf "server RSS           %.1f MiB before, %.1f MiB after; %.1f KiB per agent\n", b/1024, a/1024, (a-b)/n }'
    kill -TERM "$server"; wait "$server" || true
    rm -rf "$data"
done

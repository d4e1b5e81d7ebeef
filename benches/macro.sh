#!/usr/bin/env bash
# Macro benchmark: builds the release binaries and runs fleetplane-bench,
# which starts the control plane as real processes (all-in-one, then five
# gateways and a coordinator over a NATS and a Redis of its own), drives it
# with fleetplane-sim processes and prints every figure of the README's
# "Measured figures" (see loadtest/src/bench/main.rs for what each means).
#
# Usage: benches/macro.sh [--first 10000] [--per-gateway 19000] [--gateways 5] [--idle-secs 60]
# Needs nats-server and redis-server on PATH (scripts/test.sh installs them).
# Loopback only; bounded in count and time; stops by itself (about 15 minutes
# at the defaults on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
cargo build --release --quiet -p fleetplane --bin fleetplane -p fleetplane-loadtest --bin fleetplane-sim --bin fleetplane-bench
RUST_LOG=${RUST_LOG:-error} FLEETPLANE_TEST_LOG=${FLEETPLANE_TEST_LOG:-error} exec target/release/fleetplane-bench "$@"

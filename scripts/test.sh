#!/usr/bin/env bash
# Runs Fleetplane's whole test suite on a fresh Debian machine with Rust.
#
# Installs what is missing (python3 with venv for the official OpAMP client
# interop test, nats-server and redis-server for the scaled-form tests;
# cargo-nextest when absent falls back to cargo test), validates deploy/, then
# runs every test of the workspace, doc tests included. Tests start what they
# need themselves (their own NATS and Redis on free loopback ports, servers on
# ephemeral ports, temporary data dirs) and install the Python client into a
# throwaway virtual environment.
#
# Usage: scripts/test.sh [extra nextest/cargo-test filter args]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        log "apt-get not found; please install: $*"
        return 1
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if [ -z "${FLEETPLANE_APT_UPDATED:-}" ]; then
        $sudo apt-get update -qq
        export FLEETPLANE_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# Python with venv and pip, for the interop test with the official client.
if ! command -v python3 >/dev/null 2>&1; then
    log "installing python3"
    apt_install python3 python3-venv python3-pip
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    log "installing python3-venv"
    apt_install python3-venv
fi

# Real NATS and Redis servers: the scaled-form tests start their own on free
# loopback ports (never the machine's shared instances), so only the binaries
# are needed.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/local/sbin/$1" ]; }
missing=()
have nats-server || missing+=(nats-server)
have redis-server || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

# A C compiler for crates with build scripts (present wherever rustup's
# default toolchain links, but say so clearly if not).
if ! command -v cc >/dev/null 2>&1; then
    log "installing a C toolchain"
    apt_install build-essential
fi

# The web console: Debian's Chromium for the browser test (Playwright drives
# it; no browser is downloaded), Node.js and the console's npm packages
# (exact versions from console/package-lock.json). The console is rebuilt
# (type-checked, bundled) before the Rust build embeds console/dist; where
# Node.js is too old for Vite, the committed console/dist is used as is.
have chromium || { log "installing chromium"; apt_install chromium; }
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    log "installing nodejs and npm"
    apt_install nodejs npm
fi
log "console: npm ci"
(cd console && npm ci --no-audit --no-fund --loglevel=error)
if node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=19)?0:1)'; then
    log "console: type-check and build"
    (cd console && npm run build --silent)
else
    log "console: Node.js $(node --version) is older than Vite needs (20.19); using the committed console/dist"
fi

log "validating deploy/ (Compose file, Kubernetes manifests) offline"
deploy/validate.sh

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Lints first: cheap, and what STYLE.md asks is in clippy.toml.
if ! cargo clippy --version >/dev/null 2>&1; then
    log "installing clippy"
    rustup component add clippy
fi
log "clippy (warnings are errors)"
cargo clippy --workspace --all-targets --quiet -- -D warnings

# Doc tests next, so that the run closes with the test runner's summary.
log "doc tests"
cargo test --workspace --doc --quiet

log "unit, integration and interop tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    log "cargo-nextest not found; using cargo test"
    cargo test --workspace --no-fail-fast --lib --bins --tests "$@"
fi

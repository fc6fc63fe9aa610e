#!/usr/bin/env bash
# The whole test suite: installs missing system packages, then runs every
# unit, property and integration test (real redis-server, real gateway and
# simulator processes over loopback), and the criterion benches once each in
# test mode. Ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
# Integration tests mostly wait on sockets: run more of them than there are cores.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-4}"

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --locked --benches 2>&1 | tee -a "$log"
cargo test --locked 2>&1 | tee -a "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"

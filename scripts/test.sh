#!/usr/bin/env bash
# The whole test suite: installs missing system packages, then runs every
# unit, property and integration test (real redis-server, real gateway and
# simulator processes over loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
# RUST_TEST_THREADS rather than `-- --test-threads`: the criterion benches (run once
# in test mode by --all-targets) refuse that flag.
RUST_TEST_THREADS="${TEST_THREADS:-4}" cargo test --locked --all-targets

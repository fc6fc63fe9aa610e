#!/usr/bin/env bash
# The whole test suite: installs missing system packages, then runs every
# unit, property and integration test (real redis-server, real gateway and
# simulator processes over loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo test --locked --all-targets -- --test-threads="${TEST_THREADS:-4}"

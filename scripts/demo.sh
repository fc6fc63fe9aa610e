#!/usr/bin/env bash
# Builds chatgate and runs `chatgate demo`: the seed's whole flow on this
# machine, with the built-in user store and LLM simulator. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked --release
exec ./target/release/chatgate demo "$@"

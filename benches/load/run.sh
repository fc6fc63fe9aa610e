#!/usr/bin/env bash
# Whole-gateway load benchmark, one command: installs wrk, nginx and python3 when missing
# (Debian), builds chatgate, the load client and the floor (a bare Pingora proxy_pass) in
# release mode, raises the fd limit and runs benches/load/run.py, which prints one markdown
# table. Knobs (environment):
# DURATION=10 CONNECTIONS=32 RATES=500,2000 STREAMS=1000,10000 PACE_MS=500 STREAM_CHUNKS=20
# ACCESS_LOG=both|warn, LIMITS=on|off, CHATGATE_BIN=path (another build to compare),
# STEPS=closed,fixed,streams,flood (add record: conversation record on vs off against a
# private PostgreSQL, RECORD_ROUNDS=6 rounds, RECORD_MESSAGES_KB=0 (N: N KiB conversations);
# accesslog: CPU per request with the access log on vs off, chatgate and nginx, rounds
# alternated). Everything listens on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ "${#need[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --locked --bin chatgate >&2
# The load client and the floor (a bare Pingora proxy_pass) are bench targets.
bench_bin() {
  cargo bench --locked --bench "$1" --no-run --message-format=json 2>/dev/null \
    | grep -o "\"executable\":\"[^\"]*$1[^\"]*\"" | tail -1 | cut -d'"' -f4
}
LOADGEN=$(bench_bin loadgen)
FLOOR=$(bench_bin floor)
[ -x "$LOADGEN" ] || { echo "cannot build the load client" >&2; exit 1; }
[ -x "$FLOOR" ] || { echo "cannot build the bare Pingora proxy" >&2; exit 1; }
export LOADGEN FLOOR

# 10,000 streams hold ~30,000 sockets across client, gateway and simulator; where the hard
# limit cannot be raised (containers), run.py runs as many streams as it allows and says so.
ulimit -Hn 200000 2>/dev/null && ulimit -Sn 200000 2>/dev/null || ulimit -Sn "$(ulimit -Hn)"
exec python3 benches/load/run.py "$@"

#!/usr/bin/env bash
# Installs what building and testing chatgate needs on Debian/Ubuntu, only
# what is missing: a C toolchain and cmake (Pingora's zlib-ng), redis-server and
# PostgreSQL (the tests start their own), and Rust via rustup when cargo is absent.
# The client tests add sseclient-py (pip), Node.js with npm and Chromium; the
# dashboard and alert tests add Prometheus (prometheus and promtool).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
# PostgreSQL server binaries for the conversation-record tests (they start their own).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import requests' >/dev/null 2>&1 || need+=(python3-requests)
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ -n "$(fc-list :lang=zh 2>/dev/null)" ] || need+=(fonts-wqy-microhei)  # CJK text in screenshots
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  need+=(ca-certificates)
fi
# Prometheus for tests/observability.rs (it starts its own on a free port), without
# the node exporter the package recommends.
prometheus=()
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || prometheus=(prometheus)

if [ "${#need[@]}" -gt 0 ] || [ "${#prometheus[@]}" -gt 0 ]; then
  echo "installing: ${need[*]} ${prometheus[*]}"
  $SUDO apt-get update -qq
fi
if [ "${#need[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "${#prometheus[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${prometheus[@]}" >/dev/null
fi

# The Debian redis-server package starts a service on 6379, postgresql one on
# 5432 and prometheus one on 9090 (also chatgate's default admin_listen: give one
# of them another port on a machine that runs both); the tests never use them.
if ! command -v cargo >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo" ]; then
  echo "installing Rust with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
fi

# Python packages the client tests drive the gateway with (tests/clients.rs:
# sseclient-py; tests/ops.rs: the official openai SDK), from PyPI when missing.
py_missing=()
python3 -c 'import sseclient' >/dev/null 2>&1 || py_missing+=(sseclient-py==1.9.0)
python3 -c 'import openai' >/dev/null 2>&1 || py_missing+=(openai)
if [ "${#py_missing[@]}" -gt 0 ]; then
  user_flag=()
  if [ "$(id -u)" -ne 0 ]; then user_flag=(--user); fi
  echo "installing Python packages: ${py_missing[*]}"
  PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q "${user_flag[@]}" "${py_missing[@]}"
fi

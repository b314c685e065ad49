#!/usr/bin/env bash
# fedlora's main job on a fresh machine: set up, then a 3-round federated LoRA simulation of
# SmolLM2-135M-Instruct on chatterbot Q/A pairs over 4 virtual clients (the embedded defaults).
# Extra arguments go to simulations/run.py, e.g. --clients 8 -c "num-server-rounds=5".
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh
exec .venv/bin/python -m simulations.run "$@"

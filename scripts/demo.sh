#!/usr/bin/env bash
# Quick start 1: set up, then run a real end-to-end transfer between two local nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/p2pshare demo "$@"

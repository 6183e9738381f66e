#!/usr/bin/env bash
# Set up and run the whole test suite (no GPU, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The real vLLM server tests/floorplan_ft/training/test_vllm.py starts lives in its own venv (its pins clash with ours).
scripts/setup-vllm.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/python -m pytest "$@"

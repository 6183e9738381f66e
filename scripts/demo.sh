#!/usr/bin/env bash
# The main job on bundled sample data: set up, generate synthetic plans, run the pipeline offline.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
exec .venv/bin/ft-pipeline demo --data-root "${DEMO_DATA_ROOT:-demo-data}" "$@"

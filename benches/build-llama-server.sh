#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` and `llama-bench` from PyPI sources
# alone: the llama.cpp tree vendored in the llama-cpp-python sdist, with
# cmake and ninja from PyPI. It is the peer serve-bench compares strata with
# (parallel slots, continuous batching), built for this CPU (GGML_NATIVE).
#
#   benches/build-llama-server.sh [DEST]     # default: target/llama.cpp
#
# Prints the path of `llama-server` last. Needs python3 with pip and venv,
# and a C/C++ compiler. (`--no-binary llama-cpp-python`, not `:all:`: pip would
# build cmake itself from source to read the sdist's metadata.)
set -euo pipefail

VERSION=0.3.36
DEST=${1:-target/llama.cpp}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
if [[ -x $DEST/bin/llama-server && -x $DEST/bin/llama-bench ]]; then
    echo "$DEST/bin/llama-server"
    exit 0
fi

command -v c++ >/dev/null || { echo "a C++ compiler is needed (apt install g++)" >&2; exit 1; }
python3 -m venv "$DEST/venv"
"$DEST/venv/bin/pip" install --quiet cmake ninja
"$DEST/venv/bin/pip" download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$DEST/sdist"
rm -rf "$DEST/src"
mkdir -p "$DEST/src"
tar -xzf "$DEST"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$DEST/src" --strip-components=1

export PATH=$DEST/venv/bin:$PATH
# No AMX: on a VM whose Xeon has it, ggml's AMX path crashes at its first
# matmul (SIGSEGV on `ldtilecfg` in ggml_backend_amx_mul_mat, though the
# kernel grants the tile state: strata's AMX kernel runs there).
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$DEST/src/vendor/llama.cpp" -B "$DEST/build" -G Ninja \
    -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$DEST/build" --target llama-server llama-bench -j "$(nproc)"
mkdir -p "$DEST/bin"
cp "$DEST/build/bin/llama-server" "$DEST/build/bin/llama-bench" "$DEST/bin/"
echo "$DEST/bin/llama-server"

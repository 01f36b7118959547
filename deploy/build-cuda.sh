#!/usr/bin/env bash
# Builds the CUDA binary (release, sm_90 for H100/H200, CUDA + NCCL) on a
# machine without a GPU or driver, and packs it for a GPU machine:
#
#   deploy/build-cuda.sh [OUT_DIR]        # default dist/strata-cuda
#
# OUT_DIR then holds `strata` and libcudart.so.13 (found through the
# binary's $ORIGIN rpath), about 58 MiB, and OUT_DIR.tar.xz the same in
# about 9 MiB. On the GPU machine the binary
# needs the NVIDIA driver (libcuda.so.1) and CUDA 13's cuBLAS, cuRAND, NVRTC
# and NCCL libraries, e.g. from PyTorch's wheels: benches/gpu-check/device-env.sh
# puts them on LD_LIBRARY_PATH.
#
# candle links those libraries at build time (cudarc's dynamic-linking), and
# no wheel ships a libcuda stub, so the link runs against stub libraries made
# here: a first link lists the symbols the binary takes from each library,
# and tiny shared objects with those names and the real sonames satisfy the
# linker. At run time the real libraries provide them.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist/strata-cuda}
TARGET=target/cuda-release
STUBS=$TARGET/stubs
eval "$(kernels/install-toolchain.sh)"
export CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
command -v gcc >/dev/null || { apt-get update -qq && apt-get install -y -qq gcc; }

# name:soname:symbol-prefix (the first prefix that matches wins).
LIBS="nccl:libnccl.so.2:nccl cublasLt:libcublasLt.so.13:cublasLt cublas:libcublas.so.13:cublas curand:libcurand.so.10:curand cuda:libcuda.so.1:cu"
mkdir -p "$STUBS"
stubs() {  # $1: file of undefined symbols (may be empty)
    for spec in $LIBS; do
        IFS=: read -r name soname _ <<<"$spec"
        : >"$STUBS/$name.c"
    done
    while read -r sym; do
        [ -n "$sym" ] || continue
        for spec in $LIBS; do
            IFS=: read -r name _ prefix <<<"$spec"
            if [[ $sym == "$prefix"* ]]; then
                echo "void $sym(void) {}" >>"$STUBS/$name.c"
                break
            fi
        done
    done <"$1"
    for spec in $LIBS; do
        IFS=: read -r name soname _ <<<"$spec"
        gcc -shared -fPIC -Wl,-soname,"$soname" -o "$STUBS/lib$name.so" "$STUBS/$name.c"
    done
}
build() {
    # The link flags of the binary alone; lld reports every undefined symbol
    # (it stops at 20 by default).
    RUSTFLAGS="-L native=$STUBS -L native=$CUDA_HOME/lib -C link-arg=-Wl,-rpath,\$ORIGIN" \
        cargo rustc --release -p strata-cli --bin strata --features cuda,nccl \
        --target-dir "$TARGET" -- -C link-arg=-Wl,--error-limit=0
}
: >"$STUBS/symbols.txt"
stubs "$STUBS/symbols.txt"
if ! build 2>"$STUBS/link.log"; then
    # GNU ld says "undefined reference to `x'", lld "undefined symbol: x".
    grep -oE "undefined (reference to \`|symbol: )[A-Za-z0-9_]+" "$STUBS/link.log" |
        sed -E "s/undefined (reference to \`|symbol: )//" | sort -u >"$STUBS/symbols.txt"
    if [ ! -s "$STUBS/symbols.txt" ]; then
        cat "$STUBS/link.log" >&2
        exit 1
    fi
    echo "linking against stubs for $(wc -l <"$STUBS/symbols.txt") driver/library symbols" >&2
    stubs "$STUBS/symbols.txt"
    build
fi

rm -rf "$OUT"
mkdir -p "$OUT"
cp "$TARGET/release/strata" "$OUT/"
strip "$OUT/strata"
cp -L "$CUDA_HOME/lib/libcudart.so.13" "$OUT/"
# The folder is ~58 MiB; a GPU machine that takes at most 64 MiB with the
# repository is sent the tarball (~9 MiB) instead.
tar -C "$(dirname "$OUT")" -cJf "$OUT.tar.xz" "$(basename "$OUT")"
du -sh "$OUT" "$OUT.tar.xz"
echo "needs: $(readelf -d "$OUT/strata" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')"

#!/usr/bin/env bash
# Builds and links `lvpipe` with CUDA on a machine without a GPU or driver,
# for a GPU machine that has no Rust toolchain: CUDA 13.0 from PyPI (the
# compiler and the cuBLAS, cuRAND and NVRTC libraries the binary links), and
# a stub `libcuda.so.1` made of the driver functions cudarc calls, for the
# link step only (the GPU machine's driver provides the real one).
#
#   scripts/build-cuda.sh [COMPUTE_CAP] [CACHE]
#
# COMPUTE_CAP: the GPU's compute capability without the dot (default 90,
# Hopper; 80 for Ampere). CACHE: where the toolkit and the stub go (default
# ~/.cache/lvpipe-cuda13-link). The binary is built without FFmpeg (no video
# sources; see Cargo.toml's `video` feature), so it needs only libturbojpeg
# besides CUDA's libraries on the GPU machine. Prints the binary's path.
# On the GPU machine, put the folders holding libcublas.so.13,
# libcurand.so.10 and libcudart.so.13 (PyPI's nvidia-* CUDA 13 wheels, or
# the toolkit) on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

CAP=${1:-90}
CACHE=${2:-$HOME/.cache/lvpipe-cuda13-link}
CUDA_HOME="$CACHE/nvidia/cu13"
if [ ! -e "$CUDA_HOME/lib/libcublas.so.13" ]; then
    python3 -m pip install -q --target "$CACHE" \
        "cuda-toolkit[nvcc,nvvm,crt,cudart,cccl,cublas,curand,nvrtc]==13.0.2"
fi
# The wheels carry versioned libraries only; the linker asks for lib*.so.
for lib in cublas cublasLt curand nvrtc cudart; do
    versioned=$(cd "$CUDA_HOME/lib" && ls "lib$lib.so."* | grep -v alt | head -n 1)
    ln -sf "$versioned" "$CUDA_HOME/lib/lib$lib.so"
done
# A stub driver: every function cudarc's driver bindings name, doing nothing.
STUB="$CACHE/stub"
mkdir -p "$STUB"
bindings=$(cargo metadata --format-version 1 --locked --features cuda |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
grep -oh 'load::<_F>("[A-Za-z0-9_]*")' "$(dirname "$bindings")/src/driver/sys/mod.rs" |
    sed 's/.*("\(.*\)")/\1/' | sort -u | awk '{ print "void " $1 "(void) {}" }' >"$STUB/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/cuda_stub.c"

export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="$CAP" CUDARC_CUDA_VERSION=13000
export RUSTFLAGS="${RUSTFLAGS:-} -L $CUDA_HOME/lib -L $STUB"
cargo build --release --locked --no-default-features --features cuda >&2
echo "${CARGO_TARGET_DIR:-target}/release/lvpipe"

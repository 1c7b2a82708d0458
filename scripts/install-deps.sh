#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages lvpipe builds against, as root or
# through sudo, after refreshing the package lists (they may be empty):
# a C/C++ toolchain for the -sys crates (oniguruma, zstd, mimalloc);
# libjpeg-turbo, which encodes the JPEGs stored in shards; FFmpeg's libraries
# for video (libx264 and libvpx come with libavcodec); clang's libclang,
# which the bindgen of ffmpeg-sys-next and mpi-sys needs; and OpenMPI
# (`mpirun` and its headers) for training as a group of processes. Then,
# for the object-storage tests, moto's S3-compatible server from PyPI into
# ~/.cache/lvpipe-moto (outside any clone; once per machine). apt-get is
# skipped where it is absent.
set -euo pipefail

if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends build-essential pkg-config libturbojpeg0-dev \
    libavcodec-dev libavformat-dev libavutil-dev libswscale-dev libavfilter-dev libavdevice-dev \
    clang libclang-dev openmpi-bin libopenmpi-dev python3 python3-pip >/dev/null
else
  echo "install-deps: no apt-get here; install the equivalents of: build-essential pkg-config libturbojpeg0-dev libav*-dev clang libclang-dev openmpi-bin libopenmpi-dev python3 python3-pip" >&2
fi

# `--target` installs into a folder of its own, which Debian's pip allows
# (no system packages change).
MOTO_DIR="${LVPIPE_MOTO:-${HOME:-/tmp}/.cache/lvpipe-moto}"
if [ ! -d "$MOTO_DIR/moto" ]; then
  python3 -m pip install -q --disable-pip-version-check --target "$MOTO_DIR" "moto[server]==5.2.5"
fi

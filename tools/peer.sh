#!/usr/bin/env bash
# tools/peer.sh VERSION DATA_DIR OUT_DIR: build llama.cpp's llama-bench, llama-perplexity,
# llama-server and llama-quantize from the llama-cpp-python VERSION sdist (which vendors llama.cpp
# under vendor/llama.cpp), for side-by-side runs with kvc. `make peer` calls it.
#
# The sdist is downloaded to DATA_DIR and unpacked under DATA_DIR/x (each step only once, and
# atomically: an interrupted step leaves nothing that looks finished); the build tree is
# OUT_DIR/build (a failed build resumes from there) and the four binaries land in OUT_DIR/bin only
# once all four are built. Environment: PYTHON (runs pip; default python3), PEER_JOBS (default 2).
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 VERSION DATA_DIR OUT_DIR" >&2
    exit 2
fi
VERSION=$1
DATA_DIR=$2
OUT_DIR=$3
PYTHON=${PYTHON:-python3}
JOBS=${PEER_JOBS:-2}
TOOLS=(llama-bench llama-perplexity llama-server llama-quantize)

SDIST=$DATA_DIR/llama_cpp_python-$VERSION.tar.gz
SRC_PARENT=$DATA_DIR/x
SRC=$SRC_PARENT/llama_cpp_python-$VERSION
LLAMA_SRC=$SRC/vendor/llama.cpp
BUILD=$OUT_DIR/build
BIN=$OUT_DIR/bin

step="starting"
fail() {
    echo "make peer: failed while $step; nothing is marked built, so the next \`make peer\` retries" >&2
    if [ -d "$BUILD" ]; then
        echo "(the build tree $BUILD is kept and resumes; remove $OUT_DIR to start over)" >&2
    fi
}
trap fail ERR

mkdir -p "$DATA_DIR" "$SRC_PARENT" "$OUT_DIR"

if [ ! -f "$SDIST" ]; then
    step="downloading the llama-cpp-python $VERSION sdist from PyPI"
    echo "peer: $step"
    "$PYTHON" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$DATA_DIR"
fi

if [ ! -f "$LLAMA_SRC/CMakeLists.txt" ]; then
    step="unpacking $SDIST"
    echo "peer: $step"
    tmp=$(mktemp -d "$SRC_PARENT/.unpack.XXXXXX")
    tar -xzf "$SDIST" -C "$tmp"
    rm -rf "$SRC"
    mv "$tmp/llama_cpp_python-$VERSION" "$SRC"
    rmdir "$tmp"
fi

# Only what the four tools need, nothing fetched: no tests, examples or unified app; static
# libraries so the binaries can move from build/ to bin/; no OpenSSL (HTTPS model downloads) and
# no web UI for llama-server (its assets would be downloaded from Hugging Face). LLAMA_CURL is
# deprecated (ignored) in this llama.cpp; it is kept off for older ones.
step="configuring llama.cpp (cmake)"
echo "peer: $step in $BUILD"
cmake -S "$LLAMA_SRC" -B "$BUILD" -Wno-dev \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF

step="building ${TOOLS[*]} (cmake --build, -j$JOBS)"
echo "peer: $step"
cmake --build "$BUILD" -j "$JOBS" --target "${TOOLS[@]}"

step="copying the binaries to $BIN"
rm -rf "$BIN.tmp"
mkdir -p "$BIN.tmp"
for tool in "${TOOLS[@]}"; do
    cp "$BUILD/bin/$tool" "$BIN.tmp/"
done
rm -rf "$BIN"
mv "$BIN.tmp" "$BIN"
echo "peer: llama.cpp (llama-cpp-python $VERSION) tools in $(cd "$BIN" && pwd): ${TOOLS[*]}"

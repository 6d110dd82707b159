#!/usr/bin/env bash
# Build llama.cpp's llama-server from source for the real-server test tier (tests/realserver/),
# once per machine: the binary is cached under
#   ${XDG_CACHE_HOME:-~/.cache}/llm-loadtest/llama-server-${LLAMA_CPP_PYTHON_VERSION}/llama-server
# and the script prints that path as its last line of stdout. A second call finds it and only
# prints the path.
#
# The source is the one llama-cpp-python's sdist (PyPI, pinned below) vendors under
# vendor/llama.cpp; cmake, ninja and a C++ compiler come from the system (installed with apt-get
# when running as root). Only the llama-server target is built, static, CPU only, without the
# web UI, HTTPS, tests or examples, and for the generic x86-64/arm64 instruction set (not
# -march=native), so a cached binary also runs on another CPU of the same architecture.
set -euo pipefail
cd "$(dirname "$0")/.."

# The llama-cpp-python release whose vendored llama.cpp is built. Bumping it rebuilds once.
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}

cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/llm-loadtest
dest=$cache_root/llama-server-$LLAMA_CPP_PYTHON_VERSION
binary=$dest/llama-server

log() { echo "build_llama_server: $*" >&2; }

if [[ -x "$binary" ]] && "$binary" --version >/dev/null 2>&1; then
  echo "$binary"
  exit 0
fi

mkdir -p "$cache_root"
# One build per machine even when two test runs start at once: the second waits for the first.
exec 9>"$cache_root/llama-server-$LLAMA_CPP_PYTHON_VERSION.lock"
flock 9
if [[ -x "$binary" ]] && "$binary" --version >/dev/null 2>&1; then
  echo "$binary"
  exit 0
fi

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
if (( ${#missing[@]} )); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${missing[*]} with apt-get"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  else
    log "needs ${missing[*]} (Debian/Ubuntu: sudo apt-get install cmake ninja-build g++); not root, so not installing them"
    exit 1
  fi
fi

python=.venv/bin/python
[[ -x $python ]] || python=python3

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
"$python" -m pip download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
  -d "$work" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
tar -xzf "$work"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION".tar.gz -C "$work" \
  "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
src=$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp

log "configuring (cmake + ninja, Release, static, CPU only)"
cmake -S "$src" -B "$work/build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_OPENSSL=OFF \
  -DLLAMA_CURL=OFF \
  -DGGML_NATIVE=OFF \
  -DGGML_OPENMP=OFF >&2

jobs=$(nproc 2>/dev/null || echo 2)
log "building llama-server with $jobs jobs (the first time takes several minutes)"
start=$SECONDS
cmake --build "$work/build" --target llama-server -j "$jobs" >&2
log "built in $((SECONDS - start)) s"

mkdir -p "$dest"
cp "$work/build/bin/llama-server" "$binary.tmp"
mv "$binary.tmp" "$binary"
"$binary" --version >&2 2>&1 || true
echo "$binary"

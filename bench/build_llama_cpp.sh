#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity) from the llama.cpp that
# llama-cpp-python's sdist vendors — the anchor of the GGUF benchmarks. ~12 min on 2 cores; skipped when built.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/bench-out/llama.cpp}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if [ -x "$OUT/bin/llama-quantize" ] && [ -x "$OUT/bin/llama-imatrix" ] && [ -x "$OUT/bin/llama-perplexity" ]; then
  echo "llama.cpp tools already built in $OUT/bin"; exit 0
fi
mkdir -p "$OUT/src"
"$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/src" -q
tar -xzf "$OUT/src/llama_cpp_python-$VERSION.tar.gz" -C "$OUT/src"
SRC="$OUT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$OUT/build" -j "$(nproc)" --target llama-quantize llama-imatrix llama-perplexity
mkdir -p "$OUT/bin"
cp "$OUT/build/bin/llama-quantize" "$OUT/build/bin/llama-imatrix" "$OUT/build/bin/llama-perplexity" "$OUT/bin/"
echo "built into $OUT/bin"

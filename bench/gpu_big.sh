#!/usr/bin/env bash
# Issue #7 on a lent H100: GPTQ w4g128 with 128×2048 calibration tokens on checkpoints with Llama-3-70B's layer
# shapes (hidden 8192, intermediate 28672, 64/8 heads) and 4 or 8 decoder layers, generated on the machine (random
# bf16 weights; SmolLM2's tokenizer, so vocab 49152). Peak GPU memory must not grow with depth.
#
#   carry .xfer/c: gguf-*.whl (the device has no gguf), tok/ (SmolLM2 tokenizer files)
#   bash bench/gpu_big.sh start [SHAPE:LAYERS:METHOD ...]  runs them in the background (one call: up to 10 min)
#   bash bench/gpu_big.sh wait SECS                         waits, copies the JSON lines to $OUT/gpu_big.jsonl
# Issue #4's speed target uses the 8b shape (32 layers): GPTQ and AWQ w4g128 end to end ≤ 5 min each.
set -euo pipefail
X=/root/qconv-big
if [ "${1:-}" = wait ]; then
  end=$((SECONDS + ${2:-500}))
  while [ $SECONDS -lt $end ] && pgrep -f "gpu_big.sh run" >/dev/null; do sleep 5; done
  cp "$X/gpu_big.jsonl" "$X/log" "$X"/prof-*.txt "${OUT:-/tmp}/" 2>/dev/null || true
  tail -5 "$X/log"
  pgrep -f "gpu_big.sh run" >/dev/null && echo "STILL RUNNING" || echo "DONE"
  exit 0
fi
if [ "${1:-}" = start ]; then
  mkdir -p "$X"
  shift
  setsid nohup bash "$0" run "$@" >"$X/log" 2>&1 &
  sleep 5
  exec bash "$0" wait 570
fi
shift  # "run"
mkdir -p "$X" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .xfer/c/gguf-*.whl
rm -rf "$X/repo" && mkdir -p "$X/repo" && cp -r qconv formats kernels calibration_data bench "$X/repo/"
TOK="$PWD/.xfer/c/tok"
cd "$X/repo"
ln -sfn ../formats qconv/formats
ln -sfn ../kernels qconv/kernels
ln -sfn ../calibration_data qconv/calibration_data
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 QCONV_CACHE="$X/cache"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# JOB = SHAPE:LAYERS:METHOD, SHAPE 8b (Llama-3-8B layers) or 70b (Llama-3-70B layers)
for JOB in ${@:-8b:32:gptq 8b:32:awq 70b:4:gptq 70b:8:gptq}; do
  IFS=: read -r SHAPE L METHOD <<<"$JOB"
  case "$SHAPE" in
  8b) DIMS="hidden=4096, intermediate=14336, heads=32, kv_heads=8" ;;
  70b) DIMS="hidden=8192, intermediate=28672, heads=64, kv_heads=8" ;;
  esac
  M="$X/llama$SHAPE-shape-$L"
  [ -f "$M/config.json" ] || python3 -c "from pathlib import Path; from qconv.testing import make_synthetic_llama as m; \
m(Path('$M'), $DIMS, layers=$L, vocab=49152, tokenizer_from=Path('$TOK'))"
  T0=$SECONDS
  # QCONV_BIG_PROFILE=1: cProfile each job, the 40 heaviest calls into prof-JOB.txt (copied to $OUT by wait)
  PROF=()
  if [ -n "${QCONV_BIG_PROFILE:-}" ]; then PROF=(-m cProfile -o "$X/prof.out"); fi
  R=$(python3 "${PROF[@]}" -m qconv quantize "$M" --method "$METHOD" --bits 4 --group-size 128 --calib-samples 128 \
    --calib-seqlen 2048 --device cuda --out "$X/out" --force --quiet --json ${QCONV_BIG_EXTRA:-} | tail -1)
  echo "{\"job\": \"$JOB\", \"wall_s\": $((SECONDS - T0)), \"summary\": $R}" | tee -a "$X/gpu_big.jsonl"
  if [ -n "${QCONV_BIG_PROFILE:-}" ]; then
    python3 -c "import pstats; pstats.Stats('$X/prof.out').sort_stats('cumulative').print_stats(40)" \
      >"$X/prof-${JOB//:/-}.txt" 2>&1
  fi
  rm -rf "$X/out"
done

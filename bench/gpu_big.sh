#!/usr/bin/env bash
# Issue #7 on a lent H100: GPTQ w4g128 with 128×2048 calibration tokens on checkpoints with Llama-3-70B's layer
# shapes (hidden 8192, intermediate 28672, 64/8 heads) and 4 or 8 decoder layers, generated on the machine (random
# bf16 weights; SmolLM2's tokenizer, so vocab 49152). Peak GPU memory must not grow with depth.
#
#   carry .xfer/c: gguf-*.whl (the device has no gguf), tok/ (SmolLM2 tokenizer files)
#   bash bench/gpu_big.sh "4 8"   → JSON lines in $OUT/gpu_big.jsonl
set -euo pipefail
X=/root/qconv-big
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
for L in ${1:-4 8}; do
  M="$X/llama70b-shape-$L"
  [ -f "$M/config.json" ] || python3 -c "from pathlib import Path; from qconv.testing import make_synthetic_llama as m; \
m(Path('$M'), hidden=8192, intermediate=28672, layers=$L, heads=64, kv_heads=8, vocab=49152, tokenizer_from=Path('$TOK'))"
  python3 -m qconv quantize "$M" --method gptq --bits 4 --group-size 128 --calib-samples 128 --calib-seqlen 2048 \
    --device cuda --out "$X/out-$L" --force --quiet --json | tail -1 | tee -a "${OUT:-/tmp}/gpu_big.jsonl"
  rm -rf "$X/out-$L"
done

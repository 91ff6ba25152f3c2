"""llm-compressor's GPTQ or AWQ on a Hugging Face folder, with calibration token ids given as a file: the anchor of
issue #4's benchmark. Runs in its own virtual environment (llm-compressor pins transformers and compressed-tensors
releases other than qconv's): bench/run.py's `llmcompressor` suite creates it.

usage: llmc_anchor.py MODEL TOKENS.json OUT --method gptq|awq --group-size 64 [--sym]
Prints {"quantize_s": …} as JSON; OUT is a compressed-tensors folder that `qconv eval` reads.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("out")
    ap.add_argument("--method", choices=["gptq", "awq"], required=True)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    a = ap.parse_args()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        # CPU workaround: llm-compressor's AWQ pins its activation cache (pipelines/cache.py), which raises "Cannot
        # access accelerator device" without one; pinning only speeds host→GPU copies, so without a GPU it is a no-op.
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    ids = json.load(open(a.tokens))
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    # float32 on CPU, as qconv computes there: CPU bf16 matmuls are several times slower and would handicap it
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=a.sym, strategy="group", group_size=a.group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    if a.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=len(ids[0]), num_calibration_samples=len(ids))
    seconds = time.perf_counter() - t0
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    print(json.dumps({"quantize_s": seconds}))


if __name__ == "__main__":
    main()

"""End to end: SmolLM2 → `qconv quantize` (RTN) → compressed-tensors safetensors → loaded by transformers with
compressed-tensors (the real loader) → logits equal to qconv's own dequantized model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from qconv.model.runner import LayerRunner, logits_fn
from qconv.model.source import open_source

pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1345, 30, 378, 1117, 9050, 28, 327, 1090, 1382, 6372]])


def qconv_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of qconv's own dequantizing reader + layer-by-layer forward (float32)."""
    src = open_source(str(path))
    r = LayerRunner(src)
    h = r.embed(ids)
    for i in range(src.num_layers):
        h = r.run(r.load_layer(i), i, h, 8)
    return logits_fn(r)(h)


def transformers_logits(path, ids: torch.Tensor, mode: str) -> torch.Tensor:
    """mode "compressed": transformers' default (CompressedLinear, decompresses on the fly);
    "dequantize": decompress every weight at load (CompressedTensorsConfig(dequantize=True))."""
    import transformers

    kwargs = {}
    if mode == "dequantize":
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(ids).logits.float()


# Asymmetric checkpoints load through the dequantize path: with transformers 5.23 + compressed-tensors 0.20 the
# default path builds the zero-point parameter unpacked ([out, G]) while compressed-tensors' own compressor (and
# this writer, bit-identically: tests/test_bitpack.py) stores it packed ([out·bits/32, G]), so the default path
# re-initialises it (upstream issue vllm-project/llm-compressor#1618).
CASES = {
    "w4g64-sym-f32": (("--bits", "4", "--group-size", "64", "--sym", "--dtype", "float32"), "compressed"),
    "w4g64-asym-f32": (("--bits", "4", "--group-size", "64", "--asym", "--dtype", "float32"), "dequantize"),
    "w8-channel-f32": (("--bits", "8", "--group-size", "-1", "--sym", "--dtype", "float32"), "compressed"),
    "w4g64-sym-bf16": (("--bits", "4", "--group-size", "64", "--sym"), "dequantize"),
    "w4g64-asym-bf16": (("--bits", "4", "--group-size", "64", "--asym"), "dequantize"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_ct_artifact(cli, smollm2_dithered_dir, tmp_path, case):
    args, mode = CASES[case]
    out = tmp_path / "art"
    r = cli("quantize", smollm2_dithered_dir, "--out", out, "--quiet", "--json", *args)
    assert r.code == 0, r.stderr
    summary = r.json()
    assert summary["quantized_linears"] == 30 * 7

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    # the real library accepts our quantization_config as its own schema
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(qc)
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.symmetric) == (int(args[1]), "--sym" in args)
    assert w.strategy == ("channel" if args[3] == "-1" else "group")

    ref = transformers_logits(out, IDS, mode)
    ours = qconv_logits(out, IDS)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # and the quantization did something: logits differ from the base model's
    base = qconv_logits(smollm2_dithered_dir, IDS)
    assert (base - ours).abs().max() > 1e-2


def test_console_script_end_to_end(smollm2_dir, tmp_path):
    """The installed `qconv` entry point, GGUF-derived model in, artifact out, real exit code."""
    out = tmp_path / "w4"
    exe = [sys.executable, "-m", "qconv"]
    p = subprocess.run([*exe, "quantize", str(smollm2_dir), "--bits", "4", "--group-size", "32", "--asym", "--out",
                        str(out), "--json", "--quiet"], capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    summary = json.loads(p.stdout)
    assert summary["ok"] and summary["output"] == str(out.resolve())
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["config"]["group_size"] == 32 and manifest["config"]["symmetric"] is False
    assert manifest["verification"]["tensors"] == 210
    assert len(manifest["tensors"]) == 210
    assert all(t["rel_mse"] > 0 for t in manifest["tensors"].values())
    assert manifest["input"]["files"][0]["sha256"]
    assert (out / "README.md").read_text().startswith("---")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file()

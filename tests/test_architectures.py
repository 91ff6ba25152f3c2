"""Every supported family (llama, mistral, qwen2, qwen3): qconv's layer-at-a-time forward equals transformers'
full model, and a quantized artifact loads in transformers with the logits qconv computes for it."""

from __future__ import annotations

import json

import pytest
import torch

from qconv.errors import InputError
from qconv.model.arch import SUPPORTED, adapter_for
from qconv.model.runner import LayerRunner, logits_fn
from qconv.model.source import open_source

from conftest import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def ours(path, ids):
    src = open_source(str(path))
    r = LayerRunner(src)
    h = r.embed(ids)
    for i in range(src.num_layers):
        h = r.run(r.load_layer(i), i, h, 2)
    return logits_fn(r)(h)


def theirs(path, ids):
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return m(ids).logits


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_files):
    root = tmp_path_factory.mktemp("families")
    return {f: tiny_model(root, f, tokenizer_files, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_forward_equals_transformers(models, family):
    ids = torch.randint(0, 49152, (3, 40), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(models[family], ids), theirs(models[family], ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_family_loads_in_transformers(cli, models, family, tmp_path):
    out = tmp_path / "q"
    r = cli("quantize", models[family], "--bits", 4, "--group-size", 32, "--dtype", "float32", "--out", out, "-q")
    assert r.code == 0, r.stderr
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(out, ids), theirs(out, ids), rtol=1e-4, atol=1e-4)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    if family == "qwen3":  # q/k norms are kept dense
        src = open_source(str(out))
        assert "model.layers.0.self_attn.q_norm.weight" in src.names()


def test_adapter_table():
    assert set(SUPPORTED) == set(FAMILIES) | {"mixtral", "qwen3_moe"}  # the MoE families: tests/test_moe.py
    a = adapter_for({"model_type": "qwen2"}, "x")
    assert a.linears[:3] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert [g.feeds_from for g in a.groups] == ["input_layernorm", "self_attn.v_proj", "post_attention_layernorm",
                                               "mlp.up_proj"]  # fmt: skip
    with pytest.raises(InputError, match="unsupported architecture 'phi3'.*supported: llama"):
        adapter_for({"model_type": "phi3"}, "somewhere")


def test_gguf_input_requantized(cli, tmp_path):
    """A GGUF file is a valid input: dequantized on load (rope permutation undone) and re-quantized."""
    out = tmp_path / "from-gguf"
    r = cli("quantize", "builtin:smollm2-135m", "--bits", 8, "--group-size", -1, "--dtype", "float32", "--out", out,
            "-q", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    ids = torch.tensor([[504, 3458, 282, 4649, 314, 1345, 30, 378]])
    # 8-bit per-channel of the GGUF's own weights: logits stay close to the GGUF model's
    base = ours("builtin:smollm2-135m", ids)
    q = ours(out, ids)
    assert (q - base).abs().mean() < 0.25, (q - base).abs().mean()
    assert (q.argmax(-1) == base.argmax(-1)).float().mean() >= 0.75

"""Mixture-of-experts models (Mixtral, Qwen3-MoE): experts run as separate linears with the fused module's exact
outputs; an expert no calibration token reaches gets plain RTN on the same grid, recorded in the manifest, and
never a NaN scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qconv.model.runner import LayerRunner
from qconv.model.source import open_source

EXPERTS = 4


def moe_model(tmp: Path, model_type: str, tokenizer_dir: Path, starve: bool) -> Path:
    """A tiny random MoE checkpoint. With ``starve``, routing is top-1 and expert 3's router row is the mean of
    experts 0 and 1's: its logit never exceeds both of theirs, so no token ever reaches it."""
    import transformers

    from qconv.formats.hf_folder import copy_tokenizer

    torch.manual_seed(0)
    kw = dict(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
              num_experts_per_tok=1 if starve else 2)  # fmt: skip
    if model_type == "mixtral":
        kw.update(num_local_experts=EXPERTS, intermediate_size=96)
    else:
        kw.update(num_experts=EXPERTS, moe_intermediate_size=96, intermediate_size=96)
    model = transformers.AutoModelForCausalLM.from_config(transformers.CONFIG_MAPPING[model_type](**kw)).float()
    if starve:
        for layer in model.model.layers:
            w = layer.mlp.gate.weight.data
            w[3] = (w[0] + w[1]) / 2
    out = tmp / model_type
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out)
    return out


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_unfused_experts_compute_the_fused_layer(tmp_path, tokenizer_files, model_type):
    import transformers
    from transformers.masking_utils import create_causal_mask

    path = moe_model(tmp_path, model_type, tokenizer_files, starve=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    src = open_source(str(path))
    runner = LayerRunner(src)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    h = runner.embed(ids)
    pos = torch.arange(16)[None]
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, past_key_values=None,
                                  position_ids=pos)  # fmt: skip
        ref = model.model.layers[0](x, attention_mask=mask, position_ids=pos,
                                    position_embeddings=model.model.rotary_emb(x, pos))  # fmt: skip
    ref = ref[0] if isinstance(ref, tuple) else ref
    got = runner.forward_layer(runner.load_layer(0), 0, h)
    assert torch.equal(got, ref)
    assert src.adapter.num_experts == EXPERTS
    assert f"{src.adapter.experts.block}.experts.3.{src.adapter.experts.down}" in src.adapter.linears


@pytest.fixture(scope="module")
def starved_mixtral(tmp_path_factory, tokenizer_files) -> Path:
    return moe_model(tmp_path_factory.mktemp("moe"), "mixtral", tokenizer_files, starve=True)


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_unrouted_expert_gets_recorded_rtn_fallback(cli, starved_mixtral, tmp_path, method):
    out = tmp_path / method
    extra = ["--clip", "mse"] if method == "rtn" else []
    r = cli("quantize", starved_mixtral, "--out", out, "--method", method, "--bits", "4", "--group-size", "32",
            "--calib-samples", "8", "--calib-seqlen", "64", "--quiet", *extra)  # fmt: skip
    assert r.code == 0, r.stderr
    tensors = json.loads((out / "qconv.json").read_text())["tensors"]
    experts = {n: row for n, row in tensors.items() if ".experts." in n}
    assert len(experts) == 2 * 3 * EXPERTS
    for name, row in experts.items():
        starved = ".experts.3." in name
        assert bool(row.get("fallback_rtn")) == starved, (name, row)
        assert all(v == v for v in row.values() if isinstance(v, float)), (name, row)  # no NaN figure
    # every stored weight reads back finite, the unrouted expert's too
    src = open_source(str(out))
    for name in src.names():
        if ".experts." in name and name.endswith(".weight"):
            assert torch.isfinite(src.read(name)).all(), name


def test_unrouted_expert_fp8_gptq_falls_back_to_rounding(cli, starved_mixtral, tmp_path):
    """FP8 with GPTQ error feedback: an expert without a Hessian is rounded to nearest, recorded, finite."""
    out = tmp_path / "fp8"
    r = cli("quantize", starved_mixtral, "--out", out, "--method", "fp8", "--opt", "fp8_gptq=true", "--opt",
            "activations=none", "--calib-samples", "8", "--calib-seqlen", "64", "--quiet")  # fmt: skip
    assert r.code == 0, r.stderr
    tensors = json.loads((out / "qconv.json").read_text())["tensors"]
    experts = {n: row for n, row in tensors.items() if ".experts." in n}
    assert len(experts) == 2 * 3 * EXPERTS
    for name, row in experts.items():
        assert bool(row.get("fallback_rtn")) == (".experts.3." in name), (name, row)
        assert ("gptq_damp" in row) != bool(row.get("fallback_rtn")), (name, row)


def test_gguf_refuses_moe_clearly(cli, starved_mixtral, tmp_path):
    out = tmp_path / "m.gguf"
    r = cli("quantize", starved_mixtral, "--out", out, "--format", "gguf", "--quiet")
    assert r.code == 2
    assert "mixture-of-experts" in r.stderr and "mixtral" in r.stderr
    assert not out.exists()

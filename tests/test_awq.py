"""AWQ: the searched scales never lose to RTN on the sample and win where a few input channels dominate; folding
them into the previous op leaves the float layer's function unchanged; artifacts load in their real loaders."""

from __future__ import annotations

import json

import pytest
import torch

from qconv.methods.awq import AWQ
from qconv.methods.base import LayerContext, MethodOptions
from qconv.methods.rtn import rtn
from qconv.model.arch import adapter_for
from qconv.model.runner import LayerRunner
from qconv.model.source import open_source
from qconv.quant.awq import ALPHAS, scales_for, search_scales
from qconv.quant.tensor import IntGrid
from qconv.stats import StatsCollector

from conftest import tiny_model


def test_search_scales_wins_on_salient_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=g)
    x[:, :8] *= 25.0  # a few outlier channels, as in real LLM activations
    w = torch.randn(128, 256, generator=g) * 0.05
    grid = IntGrid(4, 64, False)

    def q(wt, _k):
        return rtn(wt, grid).dequantize(torch.float32)

    s, alpha, losses = search_scales(x, x.abs().mean(0), [w], q)
    assert losses[0] == pytest.approx(float((x @ (q(w, 0) - w).T).square().mean()), rel=1e-5)  # α = 0 is RTN
    assert alpha > 0 and min(losses) < 0.8 * losses[0]
    assert torch.equal(s, scales_for(x.abs().mean(0), alpha)) and len(losses) == len(ALPHAS)
    assert float(s[:8].mean()) > float(s[8:].mean())  # the salient channels are scaled up


def _model(tmp_path, tokenizer_files, kv_heads, family="llama"):
    import transformers

    from qconv.formats.hf_folder import copy_tokenizer

    torch.manual_seed(0)
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    cfg = configs[family](vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=32,
                                   tie_word_embeddings=False)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():  # non-zero biases (qwen2's q/k/v), so folding them is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    out = tmp_path / f"{family}-kv{kv_heads}"
    model.save_pretrained(out)
    copy_tokenizer(tokenizer_files, out)
    return out


@pytest.mark.parametrize(
    "family,kv_heads",
    [("llama", 4), ("llama", 2), ("qwen2", 4), ("qwen3", 4)],  # kv 4: v → o foldable; 2 (GQA): o keeps its input
)
def test_folding_keeps_the_float_layer_function(tmp_path, tokenizer_files, family, kv_heads, monkeypatch):
    # Whatever α the search would pick, every foldable group gets scales far from 1: folding must stay exact.
    gen = torch.Generator().manual_seed(2)

    def fake_search(x, x_abs, ws, q):
        return torch.rand(x_abs.shape, generator=gen) + 0.5, 0.5, []

    monkeypatch.setattr("qconv.methods.awq.search_scales", fake_search)
    src = open_source(str(_model(tmp_path, tokenizer_files, kv_heads, family)))
    r = LayerRunner(src)
    layer = r.load_layer(0)
    h = r.embed(torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(1)))
    before = r.run(layer, 0, h.clone(), 4)
    a = adapter_for(src.config, "test")

    def collect(wanted):
        with StatsCollector(layer, wanted) as stats:
            r.run(layer, 0, h.clone(), 4)
        return stats

    norm0 = layer.input_layernorm.weight.detach().clone()
    o0 = layer.self_attn.o_proj.weight.detach().clone()
    ctx = LayerContext(0, layer, list(a.linears), {n: IntGrid(4, 32, True) for n in a.linears}, collect,
                       "model.layers.0.", list(a.groups))  # fmt: skip
    AWQ(MethodOptions()).apply_scales(ctx)
    after = r.run(layer, 0, h.clone(), 4)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(layer.input_layernorm.weight, norm0)  # scales were applied…
    assert "input_layernorm.weight" in ctx.overrides  # …and reach the writer
    assert torch.equal(layer.self_attn.o_proj.weight, o0) == (kv_heads == 2)  # GQA: v → o cannot fold
    if family == "qwen2":  # v's bias scaled with its rows, and handed to the writer
        assert "self_attn.v_proj.bias" in ctx.overrides


@pytest.mark.slow
@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_compressed_tensors_loads_in_transformers(cli, tokenizer_files, tmp_path, method):
    from test_ct_e2e import IDS, qconv_logits, transformers_logits

    model = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "awq"
    r = cli("quantize", model, "--out", out, "-q", "--json", "--method", method, "--bits", "4", "--group-size", "32",
            "--sym", "--dtype", "float32", "--calib-samples", "8", "--calib-seqlen", "64")  # fmt: skip
    assert r.code == 0, r.stderr
    ref = transformers_logits(out, IDS, "compressed")
    torch.testing.assert_close(qconv_logits(out, IDS), ref, rtol=1e-4, atol=1e-4)
    assert json.loads((out / "qconv.json").read_text())["config"]["method"] == method
    if method == "awq":
        # At 8 bits the artifact must compute (nearly) the base model's function: true only if the scaled norms
        # and previous-linear rows were written along with the scaled weights.
        out8 = tmp_path / "awq8"
        r = cli("quantize", model, "--out", out8, "-q", "--method", "awq", "--bits", "8", "--group-size", "32",
                "--dtype", "float32", "--calib-samples", "8", "--calib-seqlen", "64")  # fmt: skip
        assert r.code == 0, r.stderr
        base, q8 = qconv_logits(model, IDS), qconv_logits(out8, IDS)
        assert float((q8 - base).abs().max()) < 0.1 * float(base.std())  # unwritten norms: ~0.2 std here
        st = __import__("safetensors.torch", fromlist=["load_file"])
        norm = "model.layers.0.input_layernorm.weight"
        assert not torch.equal(st.load_file(str(out8 / "model.safetensors"))[norm], st.load_file(
            str(model / "model.safetensors"))[norm])  # fmt: skip

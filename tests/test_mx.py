"""MXFP4 / NVFP4: E2M1 rounding and packing bit-identical to compressed-tensors' own packer and compressors, GGUF
MXFP4 against gguf-py's reference, the gpt-oss blocks/scales layout against transformers' own conversion, the
searched scales never worse than the spec's rule, and artifacts that transformers / llama.cpp load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qconv.formats.gptoss_mxfp4 import from_gptoss, to_gptoss
from qconv.kernels.mx import ct_fp4_reference, gptoss_reference, pack_nibbles
from qconv.quant import mx

from conftest import tiny_model


def weights(out_f=64, in_f=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, :7] *= 8  # a few outlier columns, as in real linears
    w[5, :64] = 0  # all-zero blocks
    return w


def quantize(kind: str, w, search="mse", importance=None, out_dtype=torch.bfloat16):
    grid = mx.FP4Grid(kind, out_dtype)
    f = mx.quantize_mxfp4 if kind == "mxfp4" else mx.quantize_nvfp4
    return f(w, grid, search, importance)


def test_e2m1_rounding_matches_compressed_tensors():
    from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

    x = torch.linspace(-7, 7, 28001)
    x = torch.cat([x, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0])])
    ours = mx.e2m1_values(mx.e2m1_codes(x))
    theirs = cast_to_fp4(x.clamp(-6, 6).clone())
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("search", ["naive", "mse"])
def test_packing_and_scales_bit_identical_to_compressed_tensors(kind, search):
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import quantize_and_pack_fp4
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16

    w = weights()
    qt = quantize(kind, w, search)
    float_scale = qt.block_scales() if kind == "mxfp4" else qt.scales.float()
    ours = pack_nibbles(qt.codes)
    # their fused quantize+pack with our scales picks the same codes
    theirs = quantize_and_pack_fp4(w, float_scale, global_scale=qt.global_scale, group_size=qt.grid.block)
    assert torch.equal(theirs, ours)
    comp, preset = (MXFP4PackedCompressor, MXFP4A16) if kind == "mxfp4" else (NVFP4PackedCompressor, NVFP4A16)
    scheme = QuantizationScheme(targets=["Linear"], **preset)
    sd = {"weight": w, "weight_scale": float_scale}
    if kind == "nvfp4":
        sd["weight_global_scale"] = qt.global_scale
    packed = comp.compress(sd, scheme)
    assert torch.equal(packed["weight_packed"], ours)
    assert torch.equal(packed["weight_scale"].view(torch.uint8), qt.scales.view(torch.uint8))
    # their decompression is our dequantization, bit for bit, and so is our reference kernel
    deq = comp.decompress(packed, scheme)["weight"]
    assert torch.equal(deq.float(), qt.dequantize(torch.float32))
    args = {"packed": ours, "scale": qt.scales, "shape": qt.shape, "global_scale": qt.global_scale}
    assert torch.equal(ct_fp4_reference(**args, block=qt.grid.block), qt.dequantize(torch.float32))


def test_mxfp4_naive_rule_is_the_spec_rule():
    w = weights()
    qt = quantize("mxfp4", w, "naive")
    amax = w.reshape(64, -1, 32).abs().amax(-1)
    nz = amax > 0
    expect = torch.floor(torch.log2(amax[nz].double())).to(torch.int32) - 2 + 127
    assert torch.equal(qt.scales[nz].to(torch.int32), expect)


@pytest.mark.parametrize("kind", ["mxfp4", "nvfp4"])
def test_searched_scales_beat_the_naive_rule(kind):
    w = weights(128, 512, seed=1)
    naive = quantize(kind, w, "naive")
    best = quantize(kind, w, "mse")
    # per block never worse, and better overall
    b = best.grid.block

    def block_err(qt):
        return (qt.dequantize(torch.float32) - w).square().reshape(128, -1, b).sum(-1)

    assert bool((block_err(best) <= block_err(naive)).all())
    assert best.stats["rel_mse"] < 0.97 * naive.stats["rel_mse"]


def test_importance_weighted_search():
    w = weights(64, 256, seed=2)
    imp = torch.rand(256, generator=torch.Generator().manual_seed(3)) ** 4 * 100
    plain = quantize("mxfp4", w, "mse")
    weighted = quantize("mxfp4", w, "mse", importance=imp)

    def werr(qt):
        return float(((qt.dequantize(torch.float32) - w).square() * imp).sum())

    assert werr(weighted) < werr(plain)


def test_nvfp4_global_scale_convention():
    w = weights()
    qt = quantize("nvfp4", w)
    assert torch.allclose(qt.global_scale, torch.tensor([448.0 * 6.0]) / w.abs().max())
    assert qt.scales.dtype == torch.float8_e4m3fn and bool((qt.scales.float() > 0).all())


def test_gguf_mxfp4_matches_gguf_py():
    import gguf.quants as gq
    from gguf import GGMLQuantizationType

    from qconv.formats.ggml_blocks import GGMLType, pack
    from qconv.quant.tensor import GGMLGrid

    w = weights()
    ours = mx.to_ggml(quantize("mxfp4", w, "naive", out_dtype=torch.float32), GGMLGrid(GGMLType.MXFP4))
    raw = pack(ours.fields).reshape(w.shape[0], -1)
    theirs = gq.quantize(w.numpy(), GGMLQuantizationType.MXFP4)
    # same exponents; same values (gguf-py writes +0 where the sign of a value rounding to zero is kept here)
    assert np.array_equal(raw.numpy().reshape(-1, 17)[:, 0], theirs.reshape(-1, 17)[:, 0])
    deq_theirs = gq.dequantize(theirs, GGMLQuantizationType.MXFP4)
    assert np.array_equal(gq.dequantize(raw.numpy(), GGMLQuantizationType.MXFP4), deq_theirs)
    assert torch.equal(ours.dequantize(), torch.from_numpy(deq_theirs))


def test_gptoss_layout_matches_transformers_conversion():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    experts = torch.stack([weights(96, 128, seed=s) for s in range(3)])  # [E, rows, in]
    qts = [quantize("mxfp4", e) for e in experts]
    blocks, scales = to_gptoss(qts)
    assert blocks.shape == (3, 96, 4, 16) and scales.shape == (3, 96, 4)
    # transformers dequantizes [E, rows, in] and hands the experts [E, in, rows]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    ours = torch.stack([q.dequantize(torch.float32) for q in qts])
    assert torch.equal(theirs.float().transpose(1, 2), ours)
    assert torch.equal(gptoss_reference(blocks=blocks, scales=scales), ours)
    back = from_gptoss(blocks, scales)
    assert all(torch.equal(b.codes, q.codes) and torch.equal(b.scales, q.scales) for b, q in zip(back, qts))


# ----------------------------------------------------------------------------------------------------------------
# End to end: qconv's CLI → artifact → the real loaders. A tiny random llama (2 layers, 14 linears, blocks of
# 32 fit its 128/256 features) is enough: the point is the loader reading our tensors, compared bit for bit.

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1345, 30, 378, 1117, 9050, 28, 327, 1090, 1382, 6372]])


def transformers_fp4_model(path, mode: str):
    """transformers + compressed-tensors, float32. mode "dequantize": CompressedTensorsConfig(dequantize=True), every
    weight decompressed at load and cast to the model dtype; "compressed": the default path, weight_packed /
    weight_scale loaded into the modules compressed-tensors sets up, decompressed by its own decompress_model."""
    import transformers

    kwargs = {}
    if mode == "dequantize":
        kwargs["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
    if mode == "compressed":
        assert model.model.layers[0].self_attn.q_proj.weight_packed.dtype == torch.uint8
        # compressed-tensors decompresses on the first forward (a pre-hook calling this) and its FP4 unpacker
        # (unpack_fp4_from_uint8) always yields bfloat16, whatever the model dtype; unlike the dequantize path
        # nothing casts it back, so the linears would meet float32 activations with bf16 weights. Decompress as
        # the hook would, then widen to float32: exact, every bf16 is a float32.
        model.hf_quantizer.compressor.decompress_model(model)
        for p in model.parameters():
            p.data = p.data.float()
    return model


@pytest.mark.parametrize("method", ["mxfp4", "nvfp4"])
def test_transformers_loads_fp4_artifact(cli, tokenizer_files, tmp_path, method):
    from compressed_tensors.quantization import QuantizationConfig
    from test_ct_e2e import qconv_logits

    from qconv.model.source import open_source

    base = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / method
    r = cli("quantize", base, "--method", method, "--out", out, "--quiet", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["quantized_linears"] == 14
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == f"{method}-pack-quantized"
    parsed = QuantizationConfig.model_validate(qc)
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.type, w.group_size) == (4, "float", 32 if method == "mxfp4" else 16)
    src = open_source(str(out))
    names = [n.removesuffix(".weight") for n in src.names() if ".layers." in n and n.endswith("proj.weight")]
    assert len(names) == 14
    ours = qconv_logits(out, IDS)
    for mode in ("dequantize", "compressed"):
        model = transformers_fp4_model(out, mode)
        for name in names:  # the loader's weights are qconv's dequantized weights, bit for bit
            assert torch.equal(model.get_submodule(name).weight, src.read(f"{name}.weight").float()), (mode, name)
        with torch.no_grad():
            ref = model(IDS).logits.float()
        # equal weights through transformers' own layers on both sides (qconv runs them layer by layer): only
        # float32 summation order could differ, and 1e-5 on logits of magnitude ~1 leaves room for nothing else
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert (qconv_logits(base, IDS) - ours).abs().max() > 1e-2


def test_llama_cpp_runs_mxfp4_gguf(cli, tokenizer_files, tmp_path):
    import gguf
    from test_ct_e2e import qconv_logits

    from qconv.formats.gguf_reader import GGUFFile

    from llamacpp import logits as llama_logits

    base = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "m.gguf"
    # F16 embeddings and output keep the test cheap (llama.cpp's Q8_0 fit of a 49152-row table costs ~20 s here)
    r = cli("quantize", base, "--method", "mxfp4", "--format", "gguf", "--gguf-type", "Q8_0",
            "--token-embedding-type", "F16", "--output-tensor-type", "F16", "--out", out, "--quiet",
            "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    f = GGUFFile(out)
    linears = [n for n in f.tensors if n.startswith("blk.") and not n.endswith("norm.weight")]
    assert len(linears) == 14 and all(f.tensors[n].ggml_type == 39 for n in linears)  # GGML_TYPE_MXFP4
    # gguf-py's reader and MXFP4 dequantizer see the weights qconv's reader sees
    for t in gguf.GGUFReader(out).tensors:
        if t.name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
            theirs = gguf.quants.dequantize(t.data, gguf.GGMLQuantizationType.MXFP4)
            assert np.array_equal(theirs, f.read(t.name).numpy()), t.name
    got = llama_logits(out, IDS[0].tolist())
    ours = qconv_logits(out, IDS)[0]
    quant_effect = float((qconv_logits(base, IDS)[0] - ours).abs().max())
    # llama.cpp multiplies MXFP4 blocks with activations it quantizes to 8 bits (Q8_0), qconv's reference in
    # float: close, not equal — but far closer to qconv's MXFP4 model than the MXFP4 rounding itself moved it
    # (a misread block layout would be off by at least that much)
    assert quant_effect > 1e-2
    assert float((got - ours).abs().max()) < 0.1 * quant_effect
    assert (got.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9

"""HQQ: the optimiser against the hqq package's own quantizer on the same tensors (equal or better error), the
HQQLinear layout bit-exact with hqq's BitPack and HQQLinear's own dequantization, integer-zero and GGUF block
variants, and artifacts loaded by the real loaders (hqq's HQQLinear, transformers + compressed-tensors)."""

from __future__ import annotations

import json

import pytest
import torch

from qconv.formats.hqq import hqq_tensors, pack_codes
from qconv.kernels.hqq import dequant_reference, unpack_codes
from qconv.quant import hqq
from qconv.quant.tensor import GGMLGrid, IntGrid

from conftest import tiny_model

pytest.importorskip("hqq")


def weights(out_f=96, in_f=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[:, :5] *= 6  # outlier columns
    w += 0.002 * torch.randn(out_f, 1, generator=g)  # row offsets: groups not centred on zero
    return w


def hqq_package(w: torch.Tensor, bits: int, group: int, axis: int) -> torch.Tensor:
    """The hqq package's quantize → dequantize (its defaults: proximal legacy solver, 20 iterations)."""
    from hqq.core.quantize import Quantizer

    wq, meta = Quantizer.quantize(w, nbits=bits, group_size=group, axis=axis, device="cpu", bitpack=False,
                                  round_zero=bits == 4, compute_dtype=torch.float32)  # fmt: skip
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(wq, meta)


def test_groups_round_trip_both_axes():
    w = weights(24, 64)
    for axis in (0, 1):
        g = hqq.to_groups(w, 16, axis)
        assert g.shape == (24 * 64 // 16, 16)
        assert torch.equal(hqq.from_groups(g, (24, 64), axis), w)
    # axis 0 is hqq's W.reshape(g, -1): group j = flat elements j, j + N/g, ...
    assert torch.equal(hqq.to_groups(w, 16, 0)[3], w.reshape(-1)[3 :: 24 * 64 // 16])


def test_shrink_lp_is_the_proximal_operator():
    x = torch.linspace(-2, 2, 401)
    for p in (1.0, 0.7, 0.4):
        y = hqq.shrink_lp(x, 10.0, p)
        assert bool((y.abs() <= x.abs()).all()) and bool((y * x >= 0).all())
    assert torch.equal(hqq.shrink_lp(x, 10.0, 1.0), torch.sign(x) * (x.abs() - 0.1).clamp_min(0))


@pytest.mark.parametrize("bits,group,axis", [(4, 64, 1), (4, 64, 0), (3, 64, 1), (2, 32, 1), (8, 128, 1)])
@pytest.mark.parametrize("optimize_scale", [False, True])
def test_error_equal_or_better_than_hqq_package(bits, group, axis, optimize_scale):
    torch.manual_seed(0)
    w = weights(seed=bits * 10 + axis)
    theirs = hqq_package(w, bits, group, axis)
    grid = hqq.HQQGrid(bits, group, False, torch.float32, axis=axis)
    qt = hqq.quantize_hqq(w, grid, hqq.HQQConfig(optimize_scale=optimize_scale))
    ours = qt.dequantize(torch.float32)
    l2 = lambda r: float((r - w).square().sum())
    l1 = lambda r: float((r - w).abs().sum())
    assert l2(ours) <= l2(theirs) * (1 + 1e-6)
    assert l1(ours) <= l1(theirs) * (1 + 1e-3)
    assert int(qt.codes.max()) <= (1 << bits) - 1


def test_real_weights_better_than_hqq_package(smollm2_dithered_dir):
    from safetensors import safe_open

    with safe_open(str(smollm2_dithered_dir / "model.safetensors"), "pt") as f:
        w = f.get_slice("model.layers.7.self_attn.q_proj.weight")[:192].float()  # a third of the rows: cheap
    for bits in (4, 3):
        theirs = float((hqq_package(w, bits, 64, 1) - w).square().sum())
        grid = hqq.HQQGrid(bits, 64, False, torch.float32)
        same = hqq.quantize_hqq(w, grid, hqq.HQQConfig(optimize_scale=False))
        best = hqq.quantize_hqq(w, grid, hqq.HQQConfig())
        assert float((same.dequantize() - w).square().sum()) <= theirs
        assert float((best.dequantize() - w).square().sum()) <= theirs


@pytest.mark.parametrize("mode", ["project", "round"])
def test_integer_zeros_for_compressed_tensors(mode):
    from qconv.quant.int_grid import quantize_weight

    w = weights()
    grid = IntGrid(4, 64, False, torch.bfloat16, partial_groups=False)
    qt = hqq.quantize_int(w, grid, hqq.HQQConfig(int_zero=mode))
    assert torch.equal(qt.zeros, qt.zeros.round()) and float(qt.zeros.min()) >= 0 and float(qt.zeros.max()) <= 15
    assert qt.scales.dtype == torch.bfloat16
    rtn = quantize_weight(w, grid)
    assert qt.stats["rel_mse"] < rtn.stats["rel_mse"]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_packing_is_hqq_bitpack(bits):
    from hqq.core.bitpack import BitPack
    from hqq.core.quantize import Quantizer

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (40, 24), generator=g, dtype=torch.uint8)
    ours = pack_codes(codes, bits)
    packing = Quantizer.bit_to_packing[bits]
    theirs = Quantizer.pack[packing](codes)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
    assert torch.equal(unpack_codes(ours, bits, 40), codes)
    assert torch.equal(Quantizer.unpack[packing](ours, dtype=torch.uint8)[:40], codes)
    assert BitPack is not None


@pytest.mark.parametrize("bits,axis", [(4, 1), (3, 0), (2, 1)])
def test_state_dict_keys_and_dtypes_are_hqqlinears(bits, axis):
    """Our per-layer tensors are what hqq's own HQQLinear.state_dict() holds after quantizing (same names, dtypes,
    shapes and metadata), except round_zero: qconv's zero points are floats, not rounded ones."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    w = weights(96, 256, seed=bits)
    lin = torch.nn.Linear(256, 96, bias=False)
    lin.weight.data = w.clone()
    theirs = HQQLinear(lin, BaseQuantizeConfig(bits, 64, axis=axis), compute_dtype=torch.float32, device="cpu")
    theirs = theirs.state_dict()
    grid = hqq.HQQGrid(bits, 64, False, torch.float32, partial_groups=False, axis=axis)
    ours = hqq_tensors(hqq.quantize_hqq(w, grid, hqq.HQQConfig(iters=3)), torch.float32)
    assert set(ours) == set(theirs)
    for k, t in theirs.items():
        assert (ours[k].dtype, ours[k].shape) == (t.dtype, t.shape), k
        if k not in ("W_q", "scale", "zero", "round_zero"):
            assert torch.equal(ours[k], t), k
    assert int(ours["round_zero"]) == 0


@pytest.mark.parametrize(
    "bits,axis,dtype",
    [
        (4, 1, torch.bfloat16),
        (4, 0, torch.float16),
        (3, 1, torch.bfloat16),
        (2, 0, torch.float32),
        (8, 1, torch.bfloat16),
        (1, 1, torch.float16),
    ],
)
def test_hqqlinear_loads_our_state_dict(bits, axis, dtype):
    """hqq's own HQQLinear.load_state_dict (what transformers' HQQ integration calls) reads our tensors and
    dequantizes them bit-identically to qconv."""
    from hqq.core.quantize import HQQLinear

    w = weights(96, 256, seed=bits)
    grid = hqq.HQQGrid(bits, 64, False, dtype, partial_groups=False, axis=axis)
    qt = hqq.quantize_hqq(w, grid, hqq.HQQConfig(iters=5))
    sd = hqq_tensors(qt, dtype)
    layer = HQQLinear(None, None, compute_dtype=dtype, device="cpu", initialize=False)
    layer.load_state_dict(dict(sd))
    theirs = layer.dequantize()
    assert theirs.dtype == dtype and tuple(theirs.shape) == (96, 256)
    assert torch.equal(theirs.float(), qt.dequantize(torch.float32))
    args = {k: sd[k] for k in ("W_q", "scale", "zero")}
    ref = dequant_reference(**args, shape=(96, 256), nbits=bits, group_size=64, axis=axis)
    assert torch.equal(ref, qt.dequantize(torch.float32))
    x = torch.randn(3, 256).to(dtype)
    assert torch.equal(layer(x), torch.matmul(x, qt.dequantize(dtype).t()))


@pytest.mark.parametrize("ggml_type", [3, 7, 12])  # Q4_1, Q5_1, Q4_K
def test_gguf_blocks_no_worse_than_llama_cpp_fit(ggml_type):
    from qconv.quant import ggml_grid

    w = weights(32, 512, seed=ggml_type)
    qt = hqq.quantize_ggml(w, GGMLGrid(ggml_type), hqq.HQQConfig())
    ref = ggml_grid.fit(w, ggml_type)
    err_ref = float((ggml_grid.dequantize(ref, 512) - w).square().sum())
    assert float((qt.dequantize() - w).square().sum()) <= err_ref
    assert 0.0 <= qt.stats["hqq_blocks"] <= 1.0


# ----------------------------------------------------------------------------------------------------------------
# End to end: qconv's CLI → artifact → the real loader. A tiny random llama (2 layers, 14 linears) is enough: the
# point is the loader reading our tensors, and its weights and logits are compared with qconv's bit for bit.

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1345, 30, 378, 1117, 9050, 28, 327, 1090, 1382, 6372]])


def hqq_model(path):
    """transformers' model class with every quantized linear an empty hqq HQQLinear, then the whole checkpoint
    through ``model.load_state_dict``: HQQLinear._load_from_state_dict takes its own prefix's keys (how
    transformers ≤ 4.x loaded HqqConfig checkpoints; 5.x has no pre-quantized HQQ path). Returns (model, names)."""
    import transformers
    from hqq.core.quantize import HQQLinear
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(str(path))
    config.quantization_config = None
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    sd = load_file(str(path / "model.safetensors"))
    modules = sorted({k[: -len(".W_q")] for k in sd if k.endswith(".W_q")})
    for name in modules:
        parent, child = name.rsplit(".", 1)
        layer = HQQLinear(None, None, compute_dtype=torch.float32, device="cpu", initialize=False)
        setattr(model.get_submodule(parent), child, layer)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # every tensor is taken; only a tied lm_head may be absent
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    if missing:
        model.tie_weights()
    return model, modules


@pytest.mark.parametrize("bits,axis", [(4, 1), (3, 0)])
def test_hqq_artifact_loads_in_hqqlinear(cli, tokenizer_files, tmp_path, bits, axis):
    from hqq.core.quantize import HQQLinear
    from test_ct_e2e import qconv_logits
    from transformers import HqqConfig

    from qconv.model.source import open_source

    base = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "hqq"
    r = cli("quantize", base, "--method", "hqq", "--format", "hqq", "--bits", bits, "--group-size", "64", "--asym",
            "--dtype", "float32", "--opt", f"axis={axis}", "--opt", "hqq_iters=4", "--out", out, "--quiet",
            "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "hqq" and qc["quant_config"]["weight_quant_params"]["axis"] == axis
    HqqConfig.from_dict(qc)  # transformers accepts the config block
    model, modules = hqq_model(out)
    assert len(modules) == 14
    src = open_source(str(out))
    for name in modules:
        layer = model.get_submodule(name)
        # HQQLinear took its quant_config from the per-layer flags: the same as config.json's
        assert isinstance(layer, HQQLinear) and layer.quant_config["weight_quant_params"] == qc["quant_config"][
            "weight_quant_params"
        ]  # fmt: skip
        assert torch.equal(layer.dequantize(), src.read(f"{name}.weight")), name
    with torch.no_grad():
        ref = model(IDS).logits.float()
    ours = qconv_logits(out, IDS)
    # same float32 weights (checked above) through transformers' own layers on both sides; HQQLinear's matmul may
    # sum in another order than nn.Linear: 1e-5 on logits of magnitude ~1 leaves room for that only
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert (qconv_logits(base, IDS) - ours).abs().max() > 1e-2


def test_hqq_compressed_tensors_artifact_loads_in_transformers(cli, tokenizer_files, tmp_path):
    from test_ct_e2e import qconv_logits, transformers_logits

    base = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "ct"
    r = cli("quantize", base, "--method", "hqq", "--bits", "4", "--group-size", "64", "--asym", "--dtype",
            "float32", "--opt", "hqq_iters=4", "--out", out, "--quiet", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    # asymmetric int loads through transformers' dequantize path (see tests/test_ct_e2e.py CASES)
    ref = transformers_logits(out, IDS, "dequantize")
    ours = qconv_logits(out, IDS)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert (qconv_logits(base, IDS) - ours).abs().max() > 1e-2


def test_hqq_bad_options(cli, smollm2_dir, tmp_path):
    r = cli("quantize", smollm2_dir, "--method", "hqq", "--format", "hqq", "--sym", "--out", tmp_path / "x")
    assert r.code == 2 and "--asym" in r.stderr
    r = cli(
        "quantize",
        smollm2_dir,
        "--method",
        "hqq",
        "--opt",
        "lp_norm=1.5",
        "--asym",
        "--group-size",
        "64",
        "--out",
        tmp_path / "y",
    )
    assert r.code == 2 and "lp_norm" in r.stderr
    r = cli("quantize", smollm2_dir, "--method", "hqq", "--opt", "axis=2", "--out", tmp_path / "z")
    assert r.code == 2 and "axis" in r.stderr


@pytest.mark.parametrize("float_zero", [False, True])
def test_batched_layer_fit_equals_one_by_one(float_zero: bool) -> None:
    """quantize_many (a layer's linears in one batch, per-weight early stopping) gives every weight exactly what
    fitting it alone gives, for both zero kinds and both solvers."""
    from qconv.quant import hqq as hq

    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(r, 128, generator=g) * s for r, s in ((64, 0.02), (32, 0.5), (96, 0.001))]
    grid = hq.HQQGrid(4, 64, False, torch.bfloat16, axis=1) if float_zero else IntGrid(3, 64, False, torch.bfloat16)
    for opt in (False, True):
        cfg = hq.HQQConfig(optimize_scale=opt)
        batched = hq.quantize_many(ws, grid, cfg)
        for w, b in zip(ws, batched):
            alone = hq.quantize_many([w], grid, cfg)[0]
            assert torch.equal(b.codes, alone.codes)
            assert torch.equal(b.dequantize(torch.float32), alone.dequantize(torch.float32))

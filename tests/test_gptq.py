"""GPTQ: error feedback through the inverse Hessian lowers the layer-output error below RTN's on every grid family;
act-order layouts, dead columns and dampening are handled; artifacts load in their real loaders."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

from qconv.formats.ggml_blocks import GGMLType as T
from qconv.formats.ggml_blocks import pack
from qconv.methods.rtn import rtn
from qconv.quant.gptq import GPTQConfig, gptq_ggml, gptq_int, inverse_hessian_factor
from qconv.quant.int_grid import dequantize
from qconv.quant.tensor import GGMLGrid, IntGrid

from conftest import tiny_model


def _problem(out_f=96, in_f=256, n=2048, seed=0):
    """Correlated, unevenly scaled inputs (as real activations are) and a weight; H = XᵀX / n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)
    x = x @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g) / in_f**0.5)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return x, w, x.T @ x / n


def _out_err(x, w, wq):
    return float((x @ (wq - w).T).square().mean() / (x @ w.T).square().mean())


@pytest.mark.parametrize(
    "grid,cfg",
    [
        (IntGrid(4, 64, False), GPTQConfig()),
        (IntGrid(4, 64, True), GPTQConfig()),
        (IntGrid(3, 64, False), GPTQConfig(clip="mse")),
        (IntGrid(4, -1, True), GPTQConfig()),
        (IntGrid(4, 64, False, act_order=True), GPTQConfig(act_order=True)),
        (IntGrid(4, 64, False), GPTQConfig(act_order=True, static_groups=True)),
        (IntGrid(8, 32, True), GPTQConfig(block=32)),
    ],
    ids=["w4g64a", "w4g64s", "w3g64-mse", "w4-channel", "w4g64-actorder", "w4g64-static", "w8g32-block32"],
)
def test_gptq_int_beats_rtn_on_layer_output(grid, cfg):
    x, w, h = _problem()
    ref = rtn(w, IntGrid(grid.bits, grid.group_size, grid.symmetric), clip=cfg.clip, importance=h.diagonal())
    qt, info = gptq_int(w, h, grid, cfg)
    ours = _out_err(x, w, qt.dequantize(torch.float32))
    assert ours < 0.95 * _out_err(x, w, ref.dequantize(torch.float32)), ours
    assert info.damp == cfg.damp and info.dead_columns == 0
    assert qt.codes.dtype == torch.uint8 and int(qt.codes.max()) <= grid.qmax
    assert (qt.g_idx is not None) == grid.act_order


def test_act_order_layout_is_consistent():
    """g_idx groups hold exactly group_size columns, follow descending Hessian diagonal, and decode through the
    same (code − zero)·scale[g_idx] every g_idx loader computes."""
    x, w, h = _problem()
    grid = IntGrid(4, 64, False, act_order=True)
    qt, _ = gptq_int(w, h, grid, GPTQConfig(act_order=True))
    gidx = qt.g_idx.long()
    assert torch.bincount(gidx).tolist() == [64] * 4
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    assert torch.equal(gidx[order], torch.arange(256) // 64)
    assert torch.equal(qt.dequantize(torch.float32), dequantize(qt.codes, qt.scales, qt.zeros, gidx))
    # not simply contiguous: the layout really needs its g_idx
    assert not torch.equal(gidx, torch.arange(256) // 64)


def test_dead_columns_and_dampening():
    x, w, h = _problem()
    h[:, 7] = 0
    h[7, :] = 0  # an input never active in calibration
    qt, info = gptq_int(w, h, IntGrid(4, 64, False), GPTQConfig())
    assert info.dead_columns == 1 and torch.isfinite(qt.dequantize(torch.float32)).all()
    # an indefinite "Hessian" (e.g. accumulated in low precision) → damp raised until Cholesky succeeds
    bad = h.clone()
    bad[3, 3] = -2.0
    u, used = inverse_hessian_factor(bad, 0.01, 10.0)
    assert used > 0.01 and torch.isfinite(u).all()
    with pytest.raises(ValueError, match="positive definite"):
        inverse_hessian_factor(-torch.eye(8), 0.01, 0.1)


@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K, T.IQ4_XS])
def test_gptq_into_ggml_types(t):
    """GPTQ inside llama.cpp's block formats: output error below the (importance-weighted) RTN fit, and the packed
    blocks dequantize in gguf-py exactly as qconv's own reader does."""
    x, w, h = _problem(out_f=64)
    grid = GGMLGrid(int(t))
    ref = rtn(w, grid, importance=h.diagonal())
    qt, _ = gptq_ggml(w, h, grid, GPTQConfig())
    assert _out_err(x, w, qt.dequantize()) < _out_err(x, w, ref.dequantize())
    raw = pack(qt.fields).numpy().reshape(w.shape[0], -1)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t)))
    assert np.array_equal(theirs, qt.dequantize(torch.float32).numpy())
    with pytest.raises(ValueError, match="act-order"):
        gptq_ggml(w, h, grid, GPTQConfig(act_order=True))


def test_gptq_cli_errors(cli, smollm2_dithered_dir, tmp_path):
    r = cli("quantize", smollm2_dithered_dir, "--out", tmp_path / "a", "--act-order", "-q")
    assert r.code == 2 and "--method gptq" in r.stderr
    r = cli("quantize", smollm2_dithered_dir, "--out", tmp_path / "a", "--method", "gptq", "--static-groups", "-q")
    assert r.code == 2 and "--act-order" in r.stderr
    r = cli(
        "quantize",
        smollm2_dithered_dir,
        "--out",
        tmp_path / "a",
        "--method",
        "gptq",
        "--no-calib",
        "--group-size",
        "64",
        "-q",
    )
    assert r.code == 2 and "calibration" in r.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_compressed_tensors_loads_in_transformers(cli, tokenizer_files, tmp_path, act_order):
    """`--method gptq` → compressed-tensors → transformers + compressed-tensors: logits equal qconv's own."""
    from test_ct_e2e import IDS, qconv_logits, transformers_logits

    model = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "gptq"
    args = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--sym", "--dtype", "float32"]
    args += ["--calib-samples", "8", "--calib-seqlen", "64"] + (["--act-order"] if act_order else [])
    r = cli("quantize", model, "--out", out, "-q", "--json", *args)
    assert r.code == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    from compressed_tensors.quantization import QuantizationConfig

    weights = QuantizationConfig.model_validate(qc).config_groups["group_0"].weights
    assert (weights.actorder is not None) == act_order
    ref = transformers_logits(out, IDS, "compressed")
    torch.testing.assert_close(qconv_logits(out, IDS), ref, rtol=1e-4, atol=1e-4)
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["config"]["method"] == "gptq"
    layer_stats = [t for n, t in manifest["tensors"].items() if ".layers." in n]
    assert len(layer_stats) == 14 and all(t["gptq_damp"] == 0.01 for t in layer_stats)  # the damp used, recorded


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_gguf_runs_in_llama_cpp(cli, tokenizer_files, tmp_path, method):
    """GPTQ / AWQ into a llama.cpp mix: llama.cpp loads the file and its logits match qconv's dequantized model."""
    from test_gguf_e2e import qconv_logits

    from llamacpp import logits

    model = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "gptq.gguf"
    r = cli("quantize", model, "--out", out, "-q", "--method", method, "--format", "gguf", "--gguf-type", "Q4_K_M",
            "--calib-samples", "8", "--calib-seqlen", "64")  # fmt: skip
    assert r.code == 0, r.stderr
    ids = [1, 504, 3458, 282, 4649, 314, 1345, 30, 378, 1117]
    ours, theirs = qconv_logits(out, ids), logits(out, ids)
    kl = (ours.log_softmax(-1).exp() * (ours.log_softmax(-1) - theirs.log_softmax(-1))).sum(-1)
    # llama.cpp quantizes activations to 8 bits for its CPU dot products: close, not identical (see test_gguf_e2e)
    assert float(kl.mean()) < 0.05


def test_inverse_hessian_factor_is_the_textbook_one():
    """The reversed-Cholesky factor equals chol((H + λI)⁻¹, upper) computed the long way, and is upper triangular."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 120, generator=g, dtype=torch.float64) * torch.linspace(0.1, 4, 120, dtype=torch.float64)
    h = (x.T @ x / 400).float()
    u, d = inverse_hessian_factor(h, 0.01, 1.0)
    a = h.double() + 0.01 * h.double().diagonal().mean() * torch.eye(120, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(a)), upper=True)
    assert d == 0.01 and u.dtype == torch.float32 and torch.equal(u, u.triu())
    torch.testing.assert_close(u, ref.float(), rtol=1e-6, atol=1e-7)


def test_compute_dtype_is_a_setting(cli, tokenizer_files, tmp_path):
    """--compute-dtype bfloat16 runs the calibration passes in bf16 (on CPU too), bfloat16-mixed runs their matmuls
    and attention in bf16 under autocast with float32 activations and statistics (a bf16 XᵀX would fail to
    accumulate): valid artifacts, other statistics than float32's, the setting recorded in the manifest (and so in
    the resume fingerprint)."""
    from safetensors.torch import load_file

    model = tiny_model(tmp_path, "llama", tokenizer_files)
    args = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples", "4", "--calib-seqlen", "64"]
    outs = {}
    for cd in ("float32", "bfloat16", "bfloat16-mixed"):
        outs[cd] = tmp_path / cd
        r = cli("quantize", model, "--out", outs[cd], "-q", "--compute-dtype", cd, *args)
        assert r.code == 0, r.stderr
        assert json.loads((outs[cd] / "qconv.json").read_text())["config"]["compute_dtype"] == cd
    a, b, m = (load_file(outs[cd] / "model.safetensors") for cd in ("float32", "bfloat16", "bfloat16-mixed"))
    assert a.keys() == b.keys() == m.keys()
    for other in (b, m):
        assert any(not torch.equal(a[k], other[k]) for k in a if k.endswith("weight_packed"))
    assert any(not torch.equal(b[k], m[k]) for k in a if k.endswith("weight_packed"))
    r = cli("quantize", model, "--out", tmp_path / "bad", "--compute-dtype", "int8", *args)
    assert r.code == 2 and "compute-dtype" in r.stderr
    # eval's --dtype takes the plain dtypes only, and its error names its own option
    r = cli("eval", outs["float32"], "--base", model, "--dtype", "bfloat16-mixed", "-q")
    assert r.code == 2 and "--dtype bfloat16-mixed" in r.stderr and "or float16" in r.stderr


def test_wide_hessians_factor_in_float32(monkeypatch):
    """Past FLOAT64_MAX_DIM inputs the factorisation runs in float32 (memory): same factor on a benign Hessian."""
    import qconv.quant.gptq as g

    x = torch.randn(512, 96, generator=torch.Generator().manual_seed(0))
    h = x.T @ x / 512
    u64, d64 = g.inverse_hessian_factor(h, 0.01, 1.0)
    monkeypatch.setattr(g, "FLOAT64_MAX_DIM", 0)
    u32, d32 = g.inverse_hessian_factor(h, 0.01, 1.0)
    assert d32 == d64 and u32.dtype == torch.float32
    torch.testing.assert_close(u32, u64, rtol=1e-3, atol=1e-4)


@pytest.mark.triton
@pytest.mark.parametrize("rows,width", [(37, 64), (16, 100), (5, 128)])
def test_gptq_block_kernel_matches_torch_loop(rows, width):
    """The Triton column loop (run on CUDA) equals the torch loop bit for bit under the interpreter."""
    from qconv.kernels import gptq_block
    from qconv.quant.gptq import gptq_block_reference

    x, w, h = _problem(out_f=rows, in_f=width, n=512)
    u, _ = inverse_hessian_factor(h, 0.01, 1.0)
    g = torch.Generator().manual_seed(1)
    s = (torch.rand(rows, width, generator=g) + 0.5) * 0.01
    z = torch.randint(0, 16, (rows, width), generator=g).float()
    q_ref, e_ref = gptq_block_reference(w, u, s, z, 15)
    # interpreted on CPU tensors in CI; compiled on the GPU (make gpu-test), where the kernel needs CUDA tensors
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    q, e = gptq_block.gptq_block(*(t.to(dev) for t in (w, u, s, z)), 15)
    assert torch.equal(q.cpu(), q_ref)
    assert torch.equal(e.cpu(), e_ref)


@pytest.mark.parametrize(
    "grid,cfg",
    [(IntGrid(4, 64, False), GPTQConfig()), (IntGrid(4, 64, False, act_order=True), GPTQConfig(act_order=True))],
)
def test_stacked_weights_equal_separate_runs(grid, cfg):
    """q/k/v (and gate/up) share one Hessian and run stacked: each result equals its own run."""
    from qconv.quant.gptq import gptq_int_many

    _, w, h = _problem(out_f=96)
    parts = [w[:32], w[32:48], w[48:]]
    stacked = gptq_int_many(parts, h, grid, cfg)
    for p, (qt, info) in zip(parts, stacked, strict=True):
        alone, info1 = gptq_int(p, h, grid, cfg)
        assert torch.equal(qt.codes, alone.codes) and torch.equal(qt.scales, alone.scales)
        assert torch.equal(qt.zeros, alone.zeros)
        assert qt.stats == alone.stats and info.damp == info1.damp

"""kernels/w4a16.py, kernels/quant_linear.py and `qconv verify`: the fused W4A16 matmul equals x @ dequant(W)ᵀ
computed in float64 from the compressed-tensors reference dequantizer, for every variant (sym/asym, g64/g128,
act-order g_idx that sorts into static groups, arbitrary g_idx, per-channel, odd N and K, M ∈ {1, 3, 17, 64}).

Kernels run on CPU under Triton's interpreter (``triton``-marked, small shapes) and on CUDA (``gpu``-marked, model
shapes). TRITON_INTERPRET is set before triton is imported and around this module's tests only (see
tests/test_kernels_ct_int.py for why).

Tolerance, per output element: |y − ref| ≤ ulp(ref) + 2e-4·S, S = Σ_k |x_k·w_k| (float64):
- ulp(ref) (in the output dtype): the kernel rounds its float32 accumulator once; the interpreter rounds
  float32 → bfloat16 by truncation (up to one ulp), the GPU to nearest (half an ulp);
- 2e-4·S: float32 accumulation in another order (per K tile on the tensor cores, then scaled by the group's
  scale), ≈ 2^-24 × K relative to S at worst, ≪ 2e-4 for these K.
The per-column-group path (arbitrary g_idx) and the dequantize + matmul path round each weight to the activation
dtype before the product, as loaders do: there the S term is 2^-8 (half a bfloat16 ulp per weight).
A wrong scale, zero point, group or column moves an element by O(S / √K) ≫ 2e-4·S, so these tests can fail.
"""

from __future__ import annotations

import os

import torch  # noqa: E402

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    # must precede every triton import; where a GPU is present triton imports normally (the device's triton fails
    # to import in interpreter mode) and the interpreter tests switch it on at launch (lazy_jit)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from qconv.formats.bitpack import pack_rows  # noqa: E402
from qconv.kernels import ct_int, w4a16  # noqa: E402
from qconv.kernels._triton import HAVE_TRITON  # noqa: E402
from qconv.kernels.quant_linear import QuantLinear  # noqa: E402


def _restore_interpret() -> None:
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


_restore_interpret()

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install 'qconv[gpu]')")
# Triton 3.6 (the lent H100's) cannot interpret a kernel in a process that imported triton compiled: its
# triton.language helpers are compiled-mode JIT functions there. On a GPU the gpu-marked tests cover the kernel.
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() and _PREVIOUS_INTERPRET != "1",
    reason="a CUDA process imports triton compiled; the interpreter tests run where there is no GPU",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def interpreted():
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        _restore_interpret()


def ct_tensors(n, k, group, symmetric, gidx_kind, seed, device="cpu"):
    """Random compressed-tensors int4 tensors (keywords of ct_int.dequant_reference). gidx_kind: None, "actorder"
    (a column permutation of static groups, as GPTQ act-order writes), "random" (any column → group map)."""
    g = torch.Generator().manual_seed(seed)
    gs = k if group == -1 else group
    n_groups = -(-k // gs)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, n_groups, generator=g) * 0.02 + 0.002) * torch.where(
        torch.rand(n, n_groups, generator=g) < 0.5, -1.0, 1.0
    )
    zero_packed = None
    if not symmetric:
        zero_packed = pack_rows(torch.randint(0, 16, (n, n_groups), generator=g).T.contiguous(), 4).T.contiguous()
    gidx = None
    if gidx_kind == "actorder":
        gidx = (torch.arange(k) // gs)[torch.argsort(torch.randperm(k, generator=g))].to(torch.int32)
    elif gidx_kind == "random":
        gidx = torch.randint(0, n_groups, (k,), generator=g, dtype=torch.int32)
    args = {
        "packed": pack_rows(codes, 4),
        "scale": scale.to(torch.bfloat16),
        "zero_packed": zero_packed,
        "shape": (n, k),
        "bits": 4,
        "group_size": gs,
        "g_idx": gidx,
    }
    return {key: (v.to(device) if isinstance(v, torch.Tensor) else v) for key, v in args.items()}


def layout_of(args) -> w4a16.W4Layout:
    return w4a16.from_ct(**{k: v for k, v in args.items() if k != "bits"})


def assert_matches(y, x, w, lay: w4a16.W4Layout | None = None, cfg: w4a16.Config | None = None):
    """y ≈ x @ wᵀ within the module docstring's tolerance (w float32 exact weights)."""
    rel = 2e-4 if lay is None or lay.g_idx is None else 2.0**-8
    if cfg is not None and (cfg.kind in ("dequant", "gluon") or cfg.scale_w):
        rel = 2.0**-8
    ref = x.double() @ w.double().T
    s = x.double().abs() @ w.double().abs().T
    ulp = torch.finfo(y.dtype).eps * ref.abs().clamp_min(torch.finfo(y.dtype).tiny)
    err = (y.double() - ref).abs()
    bad = err > ulp + rel * s
    where = f" ({cfg.label()})" if cfg is not None else ""
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off{where}; worst |Δ| {float(err.max()):.3g}"
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------------------
# Layout conversion and torch reference (no triton)


@pytest.mark.parametrize(
    "group, symmetric, gidx_kind",
    [(64, True, None), (128, False, None), (64, False, "actorder"), (32, True, "random"), (-1, False, None),
     (48, True, None)],
)  # fmt: skip
def test_layout_dequantizes_like_compressed_tensors(group, symmetric, gidx_kind):
    args = ct_tensors(24, 384, group, symmetric, gidx_kind, seed=group)
    lay = layout_of(args)
    assert torch.equal(w4a16.dequantize(lay), ct_int.dequant_reference(**args))
    if gidx_kind == "actorder":  # sorted into static groups: the kernel gathers x's columns instead
        assert lay.perm is not None and lay.g_idx is None
    if gidx_kind == "random" or group == 48:  # no static form: per-column group map
        assert lay.g_idx is not None and lay.perm is None


def test_quant_linear_reference_mode_is_f_linear():
    args = ct_tensors(40, 256, 64, False, None, seed=3)
    tensors = {
        "weight_packed": args["packed"],
        "weight_scale": args["scale"],
        "weight_zero_point": args["zero_packed"],
        "weight_shape": torch.tensor([40, 256]),
    }
    bias = torch.randn(40)
    q = QuantLinear.from_ct(tensors, 64, bias, mode="reference")
    x = torch.randn(2, 5, 256)
    w = ct_int.dequant_reference(**args)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    assert q.kernel_calls == 0
    with pytest.raises(RuntimeError, match="cannot run"):
        QuantLinear(layout_of(args), mode="kernel")(x)  # float32 activations on CPU: no kernel


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel under the interpreter

# (n, k, group, symmetric, gidx_kind, m): every variant meets M ∈ {1, 3, 17, 64}; n never a multiple of a tile
CASES = [
    (40, 128, 64, True, None, 1),
    (72, 256, 128, False, None, 3),
    (40, 256, 64, False, "actorder", 17),
    (24, 256, 128, True, "actorder", 64),
    (40, 192, 64, True, "random", 3),
    (24, 200, -1, False, None, 1),  # per channel, K not a multiple of 16: per-column path with K masking
    (40, 128, -1, True, None, 17),  # per channel, one group spanning K: static path
    (72, 128, 128, True, None, 64),
]


@pytest.mark.triton
@needs_triton
@needs_interpreter
@pytest.mark.parametrize("n, k, group, symmetric, gidx_kind, m", CASES)
def test_kernel_matches_reference(interpreted, n, k, group, symmetric, gidx_kind, m):
    args = ct_tensors(n, k, group, symmetric, gidx_kind, seed=n + k + m)
    lay = layout_of(args)
    w = ct_int.dequant_reference(**args)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 0.5).to(torch.bfloat16)
    cands = w4a16.candidates(m, lay, x.device, x.dtype)
    # the first candidate (what tuning picks without a GPU), and the dequantize + matmul path
    for cfg in [cands[0], w4a16.Config(64, 0, 128, kind="dequant")]:
        assert_matches(w4a16.w4a16_matmul(x, lay, config=cfg), x, w, lay, cfg)


@pytest.mark.triton
@needs_triton
@needs_interpreter
def test_kernel_split_k_and_float16(interpreted):
    """Split-K partial tiles meet in the float32 workspace; float16 activations use the 1024 + code offset."""
    args = ct_tensors(40, 512, 64, False, None, seed=11)
    lay = layout_of(args)
    w = ct_int.dequant_reference(**args)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert_matches(w4a16.w4a16_matmul(x, lay, config=w4a16.Config(64, 16, 64, split_k=4)), x, w)
    xh = x.to(torch.float16)
    for cfg in w4a16.candidates(3, lay, xh.device, xh.dtype)[:1]:
        assert_matches(w4a16.w4a16_matmul(xh, lay, config=cfg), xh, w)


@pytest.mark.triton
@needs_triton
@needs_interpreter
def test_batches_past_int32_offsets_go_in_row_blocks(interpreted, monkeypatch):
    """x or y with more elements than an int32 offset reaches are multiplied in row blocks (the limit patched down
    to 3 rows' worth here), with the same result as one launch."""
    args = ct_tensors(40, 512, 64, False, None, seed=11)
    lay = layout_of(args)
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    cfg = w4a16.Config(64, 16, 64)
    whole = w4a16.w4a16_matmul(x, lay, config=cfg)
    launched = []
    real = w4a16.launch
    monkeypatch.setattr(w4a16, "launch", lambda x2, w, c: launched.append(x2.shape[0]) or real(x2, w, c))
    monkeypatch.setattr(w4a16, "INDEX_LIMIT", 3 * 512 + 100)
    assert torch.equal(w4a16.w4a16_matmul(x, lay, config=cfg), whole)
    assert launched == [3, 3, 2]


C = w4a16.Config


@pytest.mark.triton
@needs_triton
@needs_interpreter
@pytest.mark.parametrize(
    "n, k, group, symmetric, gidx_kind, m, cfgs",
    [
        (72, 512, 128, False, None, 1, [C(64, 16, 64, 4), C(64, 16, 64, 3, atomic=True), C(64, 16, 128, 2),
                                        C(32, 16, 128, 3, scale_w=True)]),
        (40, 256, 64, True, None, 3, [C(32, 16, 64, 2), C(64, 32, 64, 1, scale_w=True),
                                      C(32, 32, 64, 2, scale_w=True)]),
        (40, 256, 64, False, "actorder", 17, [C(32, 16, 64, 2, scale_w=True)]),
        (40, 192, 64, True, "random", 3, [C(32, 16, 64, 2, scale_w=True)]),
        (40, 320, 32, False, None, 5, [C(32, 16, 128, 2, scale_w=True)]),  # groups under a K step: per-column scales
    ],
)  # fmt: skip
def test_kernel_split_k_and_rounded_weights(interpreted, n, k, group, symmetric, gidx_kind, m, cfgs):
    """Split-K (partial tiles added by the last program of a tile, or fp32 reductions into a self-cleaning tile),
    K steps of 64 and 128 columns, and weights rounded to 16 bits before the MMA: all equal the reference, and a
    second call gives the same bits (the arrival counters and the sums were zeroed by the last program; the
    in-kernel reduction adds in a fixed order)."""
    args = ct_tensors(n, k, group, symmetric, gidx_kind, seed=n + k)
    lay = layout_of(args)
    w = ct_int.dequant_reference(**args)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(2)) * 0.5).to(torch.bfloat16)
    for cfg in cfgs:
        y = w4a16.w4a16_matmul(x, lay, config=cfg)
        assert_matches(y, x, w, lay, cfg)
        if not cfg.atomic:
            assert torch.equal(y, w4a16.w4a16_matmul(x, lay, config=cfg)), cfg.label()
        assert int(w4a16._scratch(x.device, "counts", 1, torch.int32).abs().sum()) == 0, cfg.label()
        assert float(w4a16._scratch(x.device, "sums", 1, torch.float32).abs().sum()) == 0, cfg.label()


def test_candidates_split_k_reductions_and_determinism(monkeypatch):
    """On a GPU's worth of multiprocessors: split-K shapes of up to 16 rows add partial tiles by fp32 reductions
    (evict-first weights), wider ones come both ways; deterministic=True (QCONV_W4A16_DETERMINISTIC=1 for the
    tuner, part of its key) keeps only fixed-order sums."""
    monkeypatch.setattr(w4a16, "_sm_count", lambda device: 132)
    lay = layout_of(ct_tensors(64, 4096, 128, True, None, seed=3))
    cpu = torch.device("cpu")
    small = w4a16.candidates(16, lay, cpu)
    assert any(c.split_k > 1 for c in small)
    assert all(c.atomic and c.evict for c in small if c.split_k > 1)
    wide = [c for c in w4a16.candidates(128, lay, cpu) if c.split_k > 1]
    assert {c.atomic for c in wide} == {True, False}
    for m in (16, 128):
        assert not any(c.atomic for c in w4a16.candidates(m, lay, cpu, deterministic=True))
    x = torch.zeros(16, 4096, dtype=torch.bfloat16)
    monkeypatch.setenv("QCONV_W4A16_DETERMINISTIC", "1")
    key = w4a16.Tuner.key(x, lay)
    monkeypatch.delenv("QCONV_W4A16_DETERMINISTIC")
    assert key != w4a16.Tuner.key(x, lay)


def test_gluon_candidates_fit_their_registers_and_the_device(monkeypatch):
    """Above 64 rows on a usable Hopper layout the tuner offers Gluon shapes, each one the kernel takes (tile and
    register budget, ``register_cap``), split only where the grid fits on the device at once and stream-K only
    where the tiles overfill it; all sum split tiles in program order. Tiles the kernel cannot take are refused
    with the reason before anything runs (a 16-row slab per warp, 64-row weight blocks, the accumulator's
    registers)."""
    from qconv.kernels import w4a16_gluon

    monkeypatch.setattr(w4a16, "_sm_count", lambda device: 132)
    monkeypatch.setattr(w4a16_gluon, "usable", lambda device, w: True)
    cpu = torch.device("cpu")
    for n, k in ((4096, 4096), (28672, 8192), (1000, 2048)):
        lay = layout_of(ct_tensors(8, 256, 128, True, None, seed=3))
        lay = w4a16.W4Layout(lay.qweight, lay.scales, None, 128, (n, k))
        for m in (65, 128, 512, 4096):
            gl_cfgs = [c for c in w4a16.candidates(m, lay, cpu) if c.kind == "gluon"]
            assert gl_cfgs and not any(c.atomic for c in gl_cfgs), (n, k, m)
            for c in gl_cfgs:
                w4a16_gluon.register_cap(c.block_n, c.block_m, c.num_warps, c.per_sm, c.loader_warp)
                tiles = -(-m // c.block_m) * -(-n // c.block_n)
                assert c.split_k == 1 or tiles * c.split_k <= c.per_sm * 132, c.label()
                assert not c.stream_k or tiles > c.per_sm * 132, c.label()
    assert w4a16_gluon.register_cap(128, 256, 8, 1, True) == 168  # 12 warps; the 8 multiplying ones get 240
    assert w4a16_gluon.register_cap(128, 128, 8, 2) == 128
    for bad, match in (((64, 128, 8), "16 per warp"), ((96, 128, 2), "multiple of 64"), ((128, 300, 8), "256"),
                       ((128, 256, 8, 2), "accumulator")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            w4a16_gluon.register_cap(*bad)
        with pytest.raises(ValueError, match=match):
            w4a16_gluon.launch(torch.zeros(4, 256), lay, *bad)


def test_exact_configs_need_k_steps_inside_a_group():
    """A Config asking for exact K steps the layout cannot give (group 32; a 128-column step over 64-column groups;
    a step that is not a multiple of 64 columns) is refused with the reason, not run with other rounding."""
    for group, cfg in ((32, C(64, 16, 64)), (64, C(64, 16, 128)), (128, C(64, 16, 32, scale_w=True))):
        lay = layout_of(ct_tensors(8, 256, group, True, None, seed=1))
        with pytest.raises(ValueError, match="K"):
            w4a16.launch(torch.zeros(1, 256, dtype=torch.bfloat16), lay, cfg)


@pytest.mark.triton
@needs_triton
@needs_interpreter
def test_quant_linear_kernel_mode_batched_with_bias(interpreted):
    args = ct_tensors(40, 128, 64, True, "actorder", seed=5)
    bias = torch.randn(40).to(torch.bfloat16)
    q = QuantLinear(layout_of(args), bias, mode="kernel")
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    y = q(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16 and q.kernel_calls == 1
    w = ct_int.dequant_reference(**args)
    ref = (x.double() @ w.double().T + bias.double()).float()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.triton
@needs_triton
@needs_interpreter
@pytest.mark.slow
def test_verify_command_runs_the_kernel(interpreted, cli, tmp_path, tokenizer_files):
    """`qconv verify` on a tiny qwen2 (biases) artifact: every linear swapped, the kernel path agrees with the
    dequantized reference, and a corrupted packed word is seen in the agreement figures."""
    from conftest import tiny_model

    base = tiny_model(tmp_path, "qwen2", tokenizer_files)
    art = tmp_path / "art"
    r = cli("quantize", base, "--out", art, "--bits", "4", "--group-size", "64", "--asym", "--no-calib",
            "--dtype", "bfloat16", "--quiet")  # fmt: skip
    assert r.code == 0, r.stderr
    r = cli("verify", art, "--base", base, "--device", "cpu", "--chunks", "2", "--ctx", "32", "--no-cache", "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["swapped_linears"] == out["quantized_linears"] == 14
    agree = out["kernel_vs_reference"]
    assert agree["top1_agreement"] > 0.9 and agree["kld_mean"] < 1e-3 and agree["rel_l2"] < 0.05
    assert out["kernel_vs_base"]["kld_mean"] > 0  # the quantization changed something

    r = cli("verify", art, "--base", base, "--device", "cpu", "--dtype", "float32", "--chunks", "1", "--ctx", "32")
    assert r.code == 2 and "float16 or bfloat16" in r.stderr


def test_verify_rejects_a_model_that_is_not_compressed_tensors(cli, tmp_path, tokenizer_files):
    from conftest import tiny_model

    base = tiny_model(tmp_path, "llama", tokenizer_files)
    r = cli("verify", base, "--base", base, "--device", "cpu", "--chunks", "1", "--ctx", "32")
    assert r.code == 2 and "not a compressed-tensors artifact" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# CUDA (make gpu-test on the device)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("group, symmetric, gidx_kind", [(128, True, None), (128, False, None), (64, True, None),
                                                         (64, False, "actorder"), (128, True, "random")])  # fmt: skip
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 200])
def test_kernel_on_cuda(group, symmetric, gidx_kind, m):
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        n, k = 3000, 4096  # n not a multiple of any tile
        args = ct_tensors(n, k, group, symmetric, gidx_kind, seed=m + group, device="cuda")
        lay = layout_of(args)
        w = ct_int.dequant_reference(**args)
        x = (torch.randn(m, k, device="cuda") * 0.5).to(torch.bfloat16)
        for cfg in w4a16.candidates(m, lay, x.device, x.dtype):
            assert_matches(w4a16.w4a16_matmul(x, lay, config=cfg), x, w, lay, cfg)
            if cfg.atomic:  # the split-K sums were zeroed again by the last program of each tile
                assert float(w4a16._scratch(x.device, "sums", 1, torch.float32).abs().sum()) == 0, cfg.label()
        y = w4a16.w4a16_matmul(x, lay)  # the tuned choice
        assert_matches(y, x, w, lay, w4a16.TUNER.best[w4a16.Tuner.key(x, lay)])
    finally:
        _restore_interpret()


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 16, 200])
def test_kernel_on_cuda_float16_and_float32_scales(symmetric, m):
    """float16 activations (the 1024 + code offset in the PTX: 0x6400) and float32 scales (weights scaled in float32
    then rounded, outside the 16-bit multiply) on every candidate."""
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        n, k = 1000, 2048
        args = ct_tensors(n, k, 128, symmetric, None, seed=m, device="cuda")
        w = ct_int.dequant_reference(**args)
        x = (torch.randn(m, k, device="cuda") * 0.5).to(torch.float16)
        for scale_dtype in (torch.bfloat16, torch.float32):
            lay = layout_of({**args, "scale": args["scale"].to(scale_dtype)})
            for cfg in w4a16.candidates(m, lay, x.device, x.dtype):
                assert_matches(w4a16.w4a16_matmul(x, lay, config=cfg), x, w, lay, cfg)
    finally:
        _restore_interpret()


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_gluon_stream_k_programs_spanning_whole_tiles(monkeypatch):
    """Stream-K over few programs (the multiprocessor count patched to 3): each program takes several whole tiles
    between a head part and a tail part; and x at an address that is not 16-byte aligned (copied for the TMA)."""
    from qconv.kernels import w4a16_gluon

    os.environ.pop("TRITON_INTERPRET", None)
    try:
        args = ct_tensors(1000, 2000, 32, False, None, seed=5, device="cuda")
        lay = layout_of(args)
        w = ct_int.dequant_reference(**args)
        x = (torch.randn(300, 2000, device="cuda") * 0.5).to(torch.bfloat16)
        if not w4a16_gluon.supported(x, lay):
            pytest.skip("needs a Hopper GPU and triton's Gluon")
        monkeypatch.setattr(w4a16, "_sm_count", lambda device: 3)
        for cfg in (w4a16.Config(128, 256, 128, 1, 8, kind="gluon", stream_k=True, loader_warp=True),
                    w4a16.Config(64, 128, 128, 1, 4, kind="gluon", per_sm=2, stream_k=True)):  # fmt: skip
            y = w4a16.w4a16_matmul(x, lay, config=cfg)
            assert_matches(y, x, w, lay, cfg)
            assert torch.equal(w4a16.w4a16_matmul(x, lay, config=cfg), y), cfg.label()
            assert not w4a16._SCRATCH[(x.device, "counts")].any(), cfg.label()
        odd = torch.empty(300 * 2000 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(300, 2000).copy_(x)
        cfg = w4a16.Config(128, 256, 128, 1, 8, kind="gluon", loader_warp=True)
        assert torch.equal(w4a16.w4a16_matmul(odd, lay, config=cfg), w4a16.w4a16_matmul(x, lay, config=cfg))
    finally:
        _restore_interpret()


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize(
    "n, k, group, symmetric, m",
    [
        (1000, 2000, 32, False, 300),
        (520, 2048, 16, True, 129),
        (384, 1104, -1, False, 257),
        (3000, 4096, 64, False, 512),
    ],
)
def test_gluon_kernel_edges(n, k, group, symmetric, m):
    """The Gluon large-batch kernel (Hopper) on edges: K not a multiple of 128 (padded steps), groups of 16/32 (a
    scale row per 16-column plane), one group spanning K, N and M not multiples of the tiles; float16 and bfloat16;
    one program per tile, 2 or 3 per tile, and stream-K (tiles split between 2–8 programs, some programs ending
    inside a tile, others spanning several), parts summed in program order (bit-identical on a second run); x loaded
    between products or by a warp of its own; the arrival counters zero again after each."""
    from qconv.kernels import w4a16_gluon

    os.environ.pop("TRITON_INTERPRET", None)
    try:
        args = ct_tensors(n, k, group, symmetric, None, seed=n + k, device="cuda")
        lay = layout_of(args)
        w = ct_int.dequant_reference(**args)
        for dtype in (torch.bfloat16, torch.float16):
            x = (torch.randn(m, k, device="cuda") * 0.5).to(dtype)
            if not w4a16_gluon.supported(x, lay):
                pytest.skip("needs a Hopper GPU and triton's Gluon")
            shapes = ((128, 256, 8, 1, True), (128, 128, 8, 2, False), (64, 128, 4, 2, True), (64, 128, 4, 2, False))
            for bn, bm, warps, per_sm, lw in shapes if dtype == torch.bfloat16 else shapes[:1]:  # (compile time)
                for split, sk in ((1, False), (2, False), (3, False), (1, True)):
                    cfg = w4a16.Config(bn, bm, 128, split, warps, kind="gluon", per_sm=per_sm, stream_k=sk,
                                       loader_warp=lw)  # fmt: skip
                    y = w4a16.w4a16_matmul(x, lay, config=cfg)
                    assert_matches(y, x, w, lay, cfg)
                    assert torch.equal(w4a16.w4a16_matmul(x, lay, config=cfg), y), cfg.label()
                    assert not w4a16._SCRATCH[(x.device, "counts")].any(), cfg.label()
    finally:
        _restore_interpret()


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_untuned_call_inside_a_graph_capture_takes_the_default(monkeypatch):
    """A call captured into a caller's CUDA graph before its shape was tuned runs the first candidate (no timing can
    run inside a capture) and leaves the shape untuned; the replay equals the eager result (deterministic split-K:
    fp32 reductions may round differently from run to run)."""
    os.environ.pop("TRITON_INTERPRET", None)
    monkeypatch.setenv("QCONV_W4A16_DETERMINISTIC", "1")
    try:
        args = ct_tensors(520, 1024, 128, True, None, seed=7, device="cuda")
        lay = layout_of(args)
        x = (torch.randn(5, 1024, device="cuda") * 0.5).to(torch.bfloat16)
        first = w4a16.candidates(5, lay, x.device, x.dtype, deterministic=True)[0]
        eager = w4a16.w4a16_matmul(x, lay, config=first)  # compiles the kernel outside the capture
        key = w4a16.Tuner.key(x, lay)
        w4a16.TUNER.best.pop(key, None)
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            y = w4a16.w4a16_matmul(x, lay)
        torch.cuda.current_stream().wait_stream(stream)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager) and key not in w4a16.TUNER.best
    finally:
        _restore_interpret()


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_split_k_scratch_first_made_inside_a_capture_belongs_to_the_graph(monkeypatch):
    """Split-K sums and counters first needed inside a CUDA-graph capture are the graph's own (zeroed by it at each
    replay): an eager call before the first replay gets zeroed buffers of its own, and both results are right."""
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        args = ct_tensors(1000, 4096, 128, True, None, seed=8, device="cuda")
        lay = layout_of(args)
        w = ct_int.dequant_reference(**args)
        x = (torch.randn(16, 4096, device="cuda") * 0.5).to(torch.bfloat16)
        cfg = next(c for c in w4a16.candidates(16, lay, x.device, x.dtype) if c.split_k > 1)
        w4a16.w4a16_matmul(x, lay, config=cfg)  # compiled outside the capture
        monkeypatch.setattr(w4a16, "_SCRATCH", {})
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            y_graph = w4a16.w4a16_matmul(x, lay, config=cfg)
        torch.cuda.current_stream().wait_stream(stream)
        for _ in range(2):
            assert_matches(w4a16.w4a16_matmul(x, lay, config=cfg), x, w, lay, cfg)
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            assert_matches(y_graph, x, w, lay, cfg)
    finally:
        _restore_interpret()


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("m", [1, 16, 128])
def test_chained_calls_read_their_input_after_it_is_written(m):
    """Each call's input is the previous call's output, with no other kernel between (eagerly and replayed from a
    CUDA graph): with programmatic dependent launches the next kernel starts before the previous has finished, and
    must wait for it before reading x (and the split-K scratch the two share)."""
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        k = 2048
        lays, ws = [], []
        for i in range(4):
            args = ct_tensors(k, k, 128, i % 2 == 0, None, seed=40 + i, device="cuda")
            lays.append(layout_of(args))
            ws.append(ct_int.dequant_reference(**args))
        cands = w4a16.candidates(m, lays[0], torch.device("cuda"), torch.bfloat16)
        if w4a16.HAVE_PDL and torch.cuda.get_device_capability() >= (9, 0):
            assert all(c.pdl for c in cands if c.kind == "fused")
        for cfg in cands:
            # a fresh input each time: the allocator hands each layer's output the blocks that held the previous
            # configuration's (nearly equal) activations, which would hide a read before the write
            x = (torch.randn(m, k, device="cuda") * 0.5).to(torch.bfloat16)

            def chain(x=x, cfg=cfg):
                outs = [x]
                for lay in lays:  # weights ~0.05: the activations grow ~2.3× a layer, far from bfloat16's range
                    outs.append(w4a16.w4a16_matmul(outs[-1], lay, config=cfg))
                return outs

            outs = chain()
            for inp, out, w, lay in zip(outs[:-1], outs[1:], ws, lays, strict=True):
                assert_matches(out, inp, w, lay, cfg)
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                g_outs = chain()
            torch.cuda.current_stream().wait_stream(stream)
            graph.replay()
            torch.cuda.synchronize()
            for inp, out, w, lay in zip(g_outs[:-1], g_outs[1:], ws, lays, strict=True):
                assert_matches(out, inp, w, lay, cfg)
    finally:
        _restore_interpret()

"""qconv/quant/int_grid.py: choosing scale / zero, rounding, and dequantizing on an integer grid.

Properties checked, over shapes, widths, group sizes, symmetric / asymmetric grids and scale dtypes:
* codes are in [0, 2^bits); a symmetric grid's zero is 2^(bits−1) everywhere;
* minmax rounding is to nearest: |w − ŵ| ≤ |scale|/2 for every element inside the grid's representable range
  (and ≤ |scale| for every element);
* clip="mse" never does worse than minmax, per group, in plain or importance-weighted squared error;
* scales are stored in the grid's dtype and the dequantization is (code − zero)·scale with that stored scale,
  exactly as a loader computing in the scale dtype gets it;
* constant and all-zero groups dequantize exactly, with no NaN;
* partial last groups and explicit (act-order) g_idx equal a reference built from column slices / permutations.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.quant.int_grid import (
    choose_qparams,
    contiguous_gidx,
    dequantize,
    group_reduce,
    quantize,
    quantize_weight,
)
from qconv.quant.tensor import IntGrid, QuantizedTensor

SCALE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(out_f: int, in_f: int, seed: int, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * scale
    # heavy-ish tails and a shifted row so asymmetric ranges are exercised
    w[0] += 3 * scale
    return w


def group_err(qt: QuantizedTensor, w: torch.Tensor, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error per (row, group), weighted per column when importance is given, in float64."""
    err = (qt.dequantize(torch.float32).double() - w.double()).square()
    if importance is not None:
        err = err * importance.double().unsqueeze(0)
    return group_reduce(err, qt.group_index(), qt.scales.shape[1], "sum")


def check_basic(qt: QuantizedTensor, w: torch.Tensor, grid: IntGrid) -> None:
    out_f, in_f = w.shape
    n_groups = int(qt.group_index().max()) + 1
    assert qt.codes.dtype == torch.uint8 and tuple(qt.codes.shape) == (out_f, in_f)
    assert int(qt.codes.max()) <= grid.qmax
    assert qt.scales.dtype == grid.scale_dtype and tuple(qt.scales.shape) == (out_f, n_groups)
    assert qt.zeros.dtype == torch.float32 and tuple(qt.zeros.shape) == (out_f, n_groups)
    assert torch.isfinite(qt.scales.float()).all() and (qt.scales != 0).all()
    assert torch.equal(qt.zeros, qt.zeros.round())
    assert int(qt.zeros.min()) >= 0 and int(qt.zeros.max()) <= grid.qmax
    if grid.symmetric:
        assert (qt.zeros == grid.mid).all()
    deq = qt.dequantize(torch.float32)
    assert torch.isfinite(deq).all()
    assert set(qt.stats) >= {"rel_mse", "max_abs_err"}


def check_rounding(qt: QuantizedTensor, w: torch.Tensor) -> None:
    """Nearest rounding inside the representable range, bounded error outside it."""
    gidx = qt.group_index()
    s = qt.scales.float()[:, gidx].abs()
    z = qt.zeros[:, gidx]
    deq = qt.dequantize(torch.float32)
    err = (deq - w).abs()
    ends = torch.stack([(0 - z) * qt.scales.float()[:, gidx], (qt.grid.qmax - z) * qt.scales.float()[:, gidx]])
    lo, hi = ends.amin(0), ends.amax(0)
    inside = (w >= lo) & (w <= hi)
    slack = 1e-6 * (w.abs() + s)  # float32 rounding of w / s and of (code − zero)·s
    assert (err[inside] <= s[inside] / 2 + slack[inside]).all(), float((err - s / 2)[inside].max())
    if qt.grid.scale_dtype == torch.float32:
        # minmax ranges cover the group up to the zero point's rounding: half a step each side at most
        assert (err <= s + slack).all(), float((err - s).max())


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [8, 32, -1])
def test_minmax_codes_zero_and_rounding(bits, symmetric, group):
    w = weight(9, 64, bits * 10 + group)
    grid = IntGrid(bits, group, symmetric)
    qt = quantize_weight(w, grid)
    check_basic(qt, w, grid)
    check_rounding(qt, w)
    assert qt.g_idx is None
    assert qt.shape == (9, 64)
    deq = qt.dequantize(torch.float32)
    assert qt.stats["max_abs_err"] == pytest.approx(float((deq - w).abs().max()))
    assert qt.stats["rel_mse"] == pytest.approx(float((deq - w).square().sum() / w.square().sum()), rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_uses_the_larger_endpoint(bits):
    # the endpoint of larger magnitude maps exactly to code 0, whatever its sign
    grid = IntGrid(bits, -1, True)
    w = torch.tensor([[0.1, -0.5, 0.3, 0.2], [0.7, -0.2, 0.0, 0.1]])
    qt = quantize_weight(w, grid)
    assert int(qt.codes[0, 1]) == 0 and int(qt.codes[1, 0]) == 0
    deq = qt.dequantize(torch.float32)
    assert float(deq[0, 1]) == -0.5 and float(deq[1, 0]) == pytest.approx(0.7, rel=1e-7)
    assert float(qt.scales[0, 0]) > 0 > float(qt.scales[1, 0])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [16, -1])
def test_mse_clip_never_worse_than_minmax(bits, symmetric, group):
    w = weight(12, 64, bits + group)
    w[2, 5] = 1.5  # an outlier: clipping pays off somewhere
    grid = IntGrid(bits, group, symmetric)
    mm = quantize_weight(w, grid)
    ms = quantize_weight(w, grid, clip="mse")
    check_basic(ms, w, grid)
    e_mm, e_ms = group_err(mm, w), group_err(ms, w)
    assert (e_ms <= e_mm * (1 + 1e-6) + 1e-12).all()
    if bits <= 4:
        assert e_ms.sum() < e_mm.sum()  # the search does find something better at low widths
    assert ms.stats["rel_mse"] <= mm.stats["rel_mse"] * (1 + 1e-6)

    imp = torch.rand(64, generator=torch.Generator().manual_seed(bits)) ** 4 * 10
    mmw = quantize_weight(w, grid, importance=imp)
    msw = quantize_weight(w, grid, clip="mse", importance=imp)
    assert torch.equal(mmw.codes, mm.codes)  # importance only steers the search
    ew_mm, ew_ms = group_err(mmw, w, imp), group_err(msw, w, imp)
    assert (ew_ms <= ew_mm * (1 + 1e-6) + 1e-12).all()
    assert "rel_mse_weighted" in msw.stats
    assert msw.stats["rel_mse_weighted"] <= mmw.stats["rel_mse_weighted"] * (1 + 1e-6)


def test_unknown_clip_mode():
    with pytest.raises(ValueError, match="unknown clip mode"):
        quantize_weight(torch.ones(2, 4), IntGrid(4, -1, True), clip="percentile")


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_scale_dtype_is_exact(scale_dtype, symmetric, bits, clip):
    w = weight(8, 48, bits).to(scale_dtype).float()  # a model in the scale dtype, as writers request
    grid = IntGrid(bits, 16, symmetric, scale_dtype=scale_dtype)
    qt = quantize_weight(w, grid, clip=clip)
    check_basic(qt, w, grid)
    gidx = qt.group_index()
    # float32 dequantization of the codes is exactly (code − zero)·(stored scale) ...
    expect32 = (qt.codes.float() - qt.zeros[:, gidx]) * qt.scales[:, gidx].float()
    assert torch.equal(qt.dequantize(torch.float32), expect32)
    # ... and rounding it once to the scale dtype is what arithmetic in that dtype gives (what loaders do)
    in_dtype = (qt.codes.to(scale_dtype) - qt.zeros[:, gidx].to(scale_dtype)) * qt.scales[:, gidx]
    assert torch.equal(qt.dequantize(scale_dtype), in_dtype)
    if clip == "minmax":
        check_rounding(qt, w)


def test_tiny_asymmetric_scales_stay_representable():
    w = torch.tensor([[0.0, 1e-41, 2e-41, 3e-41]])  # the range underflows in bfloat16 / float16
    for sdt in (torch.bfloat16, torch.float16):
        qt = quantize_weight(w, IntGrid(4, -1, False, scale_dtype=sdt))
        assert (qt.scales.float() > 0).all()
        deq = qt.dequantize(torch.float32)
        assert torch.isfinite(deq).all() and float((deq - w).abs().max()) < 1e-4


def test_symmetric_scale_underflow_stays_nonzero():
    # max |w| / 128 is below half of float16's smallest subnormal: the cast would give a zero scale (and 0/0 codes)
    w = torch.tensor([[0.0, 1e-7, -2e-7, 5e-8], [0.0, 0.0, 0.0, 0.0]])
    qt = quantize_weight(w, IntGrid(8, -1, True, scale_dtype=torch.float16))
    assert (qt.scales != 0).all()
    assert (qt.codes == 128).all()
    assert torch.equal(qt.dequantize(torch.float32), torch.zeros_like(w))


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_constant_and_zero_groups_are_exact(scale_dtype, symmetric, bits, clip):
    g = torch.Generator().manual_seed(bits)
    consts = (torch.randn(10, 3, generator=g) * 0.1).to(scale_dtype).float()
    consts[0] = 0.0
    consts[1, 1] = -0.0
    consts[2] = torch.tensor([1.0, -2.0, 0.25])
    w = consts.repeat_interleave(8, dim=1)  # [10, 24]: every group of 8 constant
    grid = IntGrid(bits, 8, symmetric, scale_dtype=scale_dtype)
    qt = quantize_weight(w, grid, clip=clip)
    check_basic(qt, w, grid)
    deq = qt.dequantize(torch.float32)
    assert not torch.isnan(deq).any()
    assert torch.equal(deq, w), (deq - w).abs().max()
    assert torch.equal(qt.dequantize(scale_dtype).float(), w)
    assert qt.stats["rel_mse"] == 0.0 and qt.stats["max_abs_err"] == 0.0


def test_all_zero_weight():
    w = torch.zeros(3, 16)
    for grid in (IntGrid(4, 8, True), IntGrid(4, 8, False), IntGrid(3, -1, False, scale_dtype=torch.float16)):
        qt = quantize_weight(w, grid, clip="mse", importance=torch.ones(16))
        assert torch.equal(qt.dequantize(torch.float32), w)
        assert qt.stats["rel_mse"] == 0.0 and qt.stats["rel_mse_weighted"] == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("in_f, group", [(40, 16), (33, 8), (7, 32), (65, 64)])
@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_partial_last_group_matches_per_slice_reference(symmetric, in_f, group, clip):
    w = weight(6, in_f, in_f)
    grid = IntGrid(4, group, symmetric, scale_dtype=torch.bfloat16)
    qt = quantize_weight(w, grid, clip=clip)
    n_groups = -(-in_f // group)
    assert grid.n_groups(in_f) == n_groups
    assert tuple(qt.scales.shape) == (6, n_groups)
    check_basic(qt, w, grid)
    # each group equals quantizing its columns alone, per channel
    for gi in range(n_groups):
        cols = slice(gi * group, min(in_f, (gi + 1) * group))
        ref = quantize_weight(w[:, cols], IntGrid(4, -1, symmetric, scale_dtype=torch.bfloat16), clip=clip)
        assert torch.equal(qt.codes[:, cols], ref.codes)
        assert torch.equal(qt.scales[:, gi : gi + 1], ref.scales)
        assert torch.equal(qt.zeros[:, gi : gi + 1], ref.zeros)
    assert torch.equal(qt.group_index(), torch.arange(in_f) // group)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits, in_f, group", [(4, 64, 16), (3, 48, 8), (8, 40, 16), (2, 30, 8)])
@pytest.mark.parametrize("clip", ["minmax", "mse"])
def test_explicit_gidx_matches_permuted_reference(symmetric, bits, in_f, group, clip):
    g = torch.Generator().manual_seed(bits * in_f)
    w = weight(5, in_f, in_f + bits)
    perm = torch.randperm(in_f, generator=g)  # act order: columns perm[0], perm[1], ... form the groups
    gidx = torch.empty(in_f, dtype=torch.int64)
    gidx[perm] = torch.arange(in_f) // group
    imp = torch.rand(in_f, generator=g) + 0.1
    grid = IntGrid(bits, group, symmetric)
    qt = quantize_weight(w, grid, gidx=gidx, clip=clip, importance=imp)
    ref = quantize_weight(w[:, perm], grid, clip=clip, importance=imp[perm])
    assert qt.g_idx is not None and qt.g_idx.dtype == torch.int32 and torch.equal(qt.g_idx.long(), gidx)
    assert torch.equal(qt.codes[:, perm], ref.codes)
    assert torch.equal(qt.scales, ref.scales)
    assert torch.equal(qt.zeros, ref.zeros)
    assert torch.equal(qt.dequantize(torch.float32)[:, perm], ref.dequantize(torch.float32))
    assert torch.equal(qt.group_index(), gidx)
    check_basic(qt, w, grid)
    if clip == "minmax":
        check_rounding(qt, w)


def test_gidx_with_unordered_groups_and_functional_pieces():
    # the pure functions compose to quantize_weight
    w = weight(4, 12, 0)
    grid = IntGrid(3, 4, False, scale_dtype=torch.float16)
    gidx = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1])
    lo = group_reduce(w, gidx, 3, "amin")
    hi = group_reduce(w, gidx, 3, "amax")
    for j in range(3):
        assert torch.equal(lo[:, j], w[:, gidx == j].amin(1))
        assert torch.equal(hi[:, j], w[:, gidx == j].amax(1))
    scale, zero = choose_qparams(lo, hi, grid)
    codes = quantize(w, scale, zero, gidx, grid)
    qt = quantize_weight(w, grid, gidx=gidx)
    assert torch.equal(qt.codes, codes) and torch.equal(qt.scales, scale) and torch.equal(qt.zeros, zero)
    assert torch.equal(qt.dequantize(torch.float32), dequantize(codes, scale, zero, gidx))
    assert torch.equal(contiguous_gidx(10, IntGrid(4, 4, True)), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]))
    assert torch.equal(contiguous_gidx(5, IntGrid(4, -1, True)), torch.zeros(5, dtype=torch.int64))


def test_grid_properties():
    g = IntGrid(3, 128, False)
    assert (g.qmax, g.mid, g.name) == (7, 4, "int3-g128-asym")
    assert IntGrid(4, -1, True).name == "int4-gc-sym"
    assert g.n_groups(300) == 3 and g.effective_group(300) == 128
    assert IntGrid(8, -1, True).n_groups(300) == 1


# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(1, 6),
    in_f=st.integers(1, 70),
    bits=st.integers(1, 8),
    group=st.sampled_from([-1, 1, 4, 8, 16, 32]),
    symmetric=st.booleans(),
    scale_dtype=st.sampled_from(SCALE_DTYPES),
    mag=st.sampled_from([1e-3, 0.05, 1.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property(out_f, in_f, bits, group, symmetric, scale_dtype, mag, seed):
    w = (torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * mag).to(scale_dtype).float()
    grid = IntGrid(bits, group, symmetric, scale_dtype=scale_dtype)
    qt = quantize_weight(w, grid)
    check_basic(qt, w, grid)
    check_rounding(qt, w)
    assert qt.scales.shape[1] == grid.n_groups(in_f)
    gidx = qt.group_index()
    assert torch.equal(
        qt.dequantize(torch.float32), (qt.codes.float() - qt.zeros[:, gidx]) * qt.scales.float()[:, gidx]
    )
    ms = quantize_weight(w, grid, clip="mse", clip_steps=6)
    check_basic(ms, w, grid)
    assert (group_err(ms, w) <= group_err(qt, w) * (1 + 1e-6) + 1e-30).all()

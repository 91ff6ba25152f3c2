"""Choosing GGML block fields (scales, mins, codes) for float weights, at llama.cpp quality or better.

For every supported type T (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS):

* ``fit(w, T, importance=None) -> <T>Fields`` chooses every field of every block of a float [rows, n] tensor
  (``rows * n / BLOCK_SIZE[T]`` blocks in row-major order, exactly the GGUF layout) so as to minimise

      Σ importance[col] · (w − dequant)²        (plain Σ (w − dequant)² when importance is None),

  ``importance`` being llama.cpp's imatrix for the tensor (mean x² of the activations feeding each input column).
  Some types weigh each element further by (1 + w²/σ²)^p, σ² the (super-)block's mean square (``SURROGATE_POWER``
  without importance, ``SURROGATE_POWER_IMP`` beside it). Without importance Q3_K takes p = ½ (sqrt(σ² + w²)):
  measured on SmolLM2 (KLD against the model, WikiText-2, H100), this lowers llama.cpp's Q2_K mix (Q3_K ffn_down)
  from 1.000× to 0.931× of llama-quantize's KLD, where plain squared error ties it; the same weighting raised Q4_K–Q6_K
  mixes' KLD by 1–9 %, and Q4_0's plain error must stay below gguf-py's, so they keep it. With importance Q3_K takes
  p = ⅛, and Q4_0 p = −⅛ on the attention's value path (``VALUE_PATH_POWER_IMP``, ``fit(value_path=True)``: there its
  large weights count a little *less* than the imatrix says): the imatrix Q2_K mix's KLD drops 4–5 % for the first
  (H100 gguf suite: 0.840× → 0.804× of llama-quantize's) and 2.7 % more for the second (0.804× → 0.782×; the Q4_0
  mix 0.817× → 0.789×); the scans are beside the tables.
* Fixed scales, new codes (GPTQ's error-feedback loop): ``requantize(w, fields)`` keeps the fields' scales and mins
  and picks the nearest codes for new weights; ``nearest_codes(w_cols, fields, col_start)`` does the same for any
  column range (block-aligned or not), ``column_values`` dequantizes such codes bit-exactly, ``element_grid`` gives
  the per-element scale and offset, ``replace_codes`` writes codes back. ``slice_columns`` and ``hstack`` cut and
  join fields by column blocks, so a caller can ``fit`` one column block at a time and assemble the tensor.
* ``dequantize(fields, n)`` -> float32 [rows, n] and ``weighted_error`` (float64) through ``ggml_blocks``.

How the fields are chosen (vectorized over blocks; Python loops run over candidates and iterations only):

1. Continuous (sub-)block scales. Symmetric grids (x ≈ s·level): trial inverse scales put the largest-magnitude
   element near either end level (clipping it when that pays), nearest levels are formed, and the least-squares s
   for those codes is solved in closed form; the best trial is kept. Affine grids (x ≈ s·q + b): a 2-D grid of trial
   scales and offsets (clipping the top and/or the bottom), each with its joint least-squares (s, b), b ≤ 0 where the
   format stores −dmin·m. Then Lloyd iterations (nearest codes for the scale, least-squares scale for the codes),
   each of which can only lower the error. llama.cpp runs a narrower one-dimensional search on surrogate weights
   (x², |x| + rms, imatrix·sqrt(σ² + x²)); here the weights are the metric's own. With importance, Q4_0, Q3_K and
   IQ4_NL/XS also try the exact optimum over every set of nearest levels a (sub-)block can have (``_exact_inv_scale``).
2. fp16 fields are rounded *before* the codes are final, so codes are always nearest for the stored values, and a
   block never ends worse than all-zero (a zero scale is always a candidate).
3. K-quants and IQ4_XS store sub-block scales (and mins) as small integers times fp16 super-block scales. The
   super-block scale starts from a rounding of the sub-block scales weighted by the error's curvature in each
   (llama.cpp's make_qp_quants uses Σ weights); a few neighbouring super-block scales are tried by the true error;
   then, per sub-block, neighbouring integer scales (and mins) are tried with nearest codes and the lowest true error
   kept, and, in alternation, the super-block scale(s) are re-solved by least squares for the chosen integers and
   codes. A super-block only takes a new state when its true error drops.

For the legacy types llama.cpp's reference choice (e.g. Q4_0's d = max / −8) is one of the candidates, so without
importance a block is not worse than llama.cpp's reference quantizer (up to float32 rounding in the comparison).

Everything stays on ``w.device`` and is device-agnostic. Work runs in chunks of whole rows (2 MB temporaries on CPU,
where cache-resident, reused buffers are several times faster than fresh allocations; 64 MB on accelerators).
Inputs are clamped to ±2³¹ (no type represents more than ~1.3e8), so no intermediate overflows float32.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from qconv.formats.ggml_blocks import (
    BLOCK_SIZE,
    KVALUES_IQ4NL,
    TYPE_SIZE,
    BlockFields,
    GGMLType,
    IQ4_NLFields,
    IQ4_XSFields,
    Q2_KFields,
    Q3_KFields,
    Q4_0Fields,
    Q4_1Fields,
    Q4_KFields,
    Q5_0Fields,
    Q5_1Fields,
    Q5_KFields,
    Q6_KFields,
    Q8_0Fields,
    dequantize_blocks,
    unpack,
)
from qconv.quant.chunks import map_chunks, thread_local
from qconv.quant.finite import count_nonfinite
from qconv.quant.tensor import ErrorSums

__all__ = [
    "SUPPORTED_TYPES",
    "ElementGrid",
    "column_values",
    "dequantize",
    "element_grid",
    "fit",
    "hstack",
    "nearest_codes",
    "replace_codes",
    "requantize",
    "slice_columns",
    "weighted_error",
]

_FP16_MAX = 65504.0
_X_MAX = 2.0**31


# --------------------------------------------------------------------------------------------------------------------
# Level grids: uniform integer ranges and the IQ4 codebook
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Levels:
    """The values a code can take, in units of the (sub-)block scale.

    Uniform grids: code c in [code_lo, code_hi] stands for level c - zero. Codebook grids (IQ4): code c stands for
    ``codebook[c]``. ``anchors`` are the levels the largest-magnitude element is mapped near by the candidate search,
    with the local level spacing (the unit of the candidate offsets).
    """

    code_lo: int
    code_hi: int
    zero: int = 0
    codebook: tuple[int, ...] | None = None

    @property
    def lo(self) -> int:
        return self.codebook[0] if self.codebook else self.code_lo - self.zero

    @property
    def hi(self) -> int:
        return self.codebook[-1] if self.codebook else self.code_hi - self.zero

    def anchors(self) -> list[tuple[float, float]]:
        if self.codebook:
            cb = self.codebook
            return [(cb[0], cb[1] - cb[0]), (cb[-1], cb[-1] - cb[-2])]
        return [(float(v), 1.0) for v in (self.lo, self.hi) if v != 0]


@functools.lru_cache(maxsize=16)
def _codebook_tables(codebook: tuple[int, ...], device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Nearest-entry lookup on a sorted integer codebook without a search.

    The nearest entry to y is the number of midpoints (v[j-1] + v[j]) / 2 that y reaches. All doubled midpoints are
    integers, so ``2y >= mid2`` is the same test as ``floor(2y) >= mid2``: a table indexed by floor(2y) (clamped to
    the span of the midpoints) gives the index directly. Ties go up, as in llama.cpp's best_index_int8.
    Returns (offset, idx_table uint8, value_table float32) with index = clamp(floor(2y), ...) - offset.
    """
    mids = [codebook[j - 1] + codebook[j] for j in range(1, len(codebook))]
    k_lo, k_hi = mids[0] - 1, mids[-1]
    ks = torch.arange(k_lo, k_hi + 1, dtype=torch.float64)
    idx = (ks[:, None] >= torch.tensor(mids, dtype=torch.float64)[None, :]).sum(1)
    vals = torch.tensor(codebook, dtype=torch.float32)[idx]
    return k_lo, idx.to(device=device, dtype=torch.uint8), vals.to(device)


def _levels_of(y: torch.Tensor, lv: _Levels) -> torch.Tensor:
    """Nearest level values (float32, same shape) for y in level units. May reuse y's storage: y is consumed."""
    if lv.codebook is None:
        return y.round_().clamp_(lv.lo, lv.hi)
    k_lo, _, vals = _codebook_tables(lv.codebook, y.device)
    k = y.mul_(2).floor_().clamp_(k_lo, k_lo + vals.numel() - 1).sub_(k_lo).long()
    return vals.take(k)


def _small_u8(y: torch.Tensor) -> torch.Tensor:
    """Float integers in [0, 127] -> uint8, through int8: torch's direct float→uint8 cast is ~8× slower (CPU)."""
    return y.to(torch.int8).view(torch.uint8)


def _codes_of(y: torch.Tensor, lv: _Levels, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Nearest stored codes (same shape, ``dtype``) for y in level units. y is consumed."""
    if lv.codebook is None:
        y = y.round_().clamp_(lv.lo, lv.hi).add_(lv.zero)
        return _small_u8(y) if dtype == torch.uint8 and lv.code_hi <= 127 else y.to(dtype)
    k_lo, idx, _ = _codebook_tables(lv.codebook, y.device)
    k = y.mul_(2).floor_().clamp_(k_lo, k_lo + idx.numel() - 1).sub_(k_lo).long()
    return idx.take(k).to(dtype)


def _code_values(codes: torch.Tensor, lv: _Levels) -> torch.Tensor:
    """Stored codes (any integer dtype) -> level values float32."""
    if lv.codebook is None:
        return codes.to(torch.float32) - lv.zero
    table = torch.tensor(lv.codebook, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


# --------------------------------------------------------------------------------------------------------------------
# Working layout and workspace
#
# A chunk of B blocks is held as float32 [n, S, B]: element i of sub-block j of block b at [i, j, b] (S sub-blocks of
# n elements; S = 1 for one-scale types). Per-sub-block quantities are [S, B], per-block ones [B]; both broadcast
# against [n, S, B] without reshapes, and every sum over a sub-block (dim 0), or over the sub-blocks of a block (dim 0
# of an [S, B] tensor), is a plain vector add. torch reduces a short *last* dimension several times slower, and
# reductions are a large part of the work here.
#
# Large temporaries come from a workspace that lives for one fit() call: a freshly allocated multi-megabyte tensor
# is page-faulted in on first touch, which costs about as much as the arithmetic done on it.
# --------------------------------------------------------------------------------------------------------------------


class _Ws:
    """Reusable float32 scratch tensors, one per (slot name, shape); small shapes are not cached."""

    def __init__(self) -> None:
        self._bufs: dict[tuple, torch.Tensor] = {}

    def empty(self, slot: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """An uninitialised float32 tensor of ``shape``, the same one each time for the same slot and shape."""
        if math.prod(shape) < (1 << 15):
            return torch.empty(shape, device=device)
        key = (slot, tuple(shape), device)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty(shape, device=device)
        return buf

    def get(self, slot: str, like: torch.Tensor) -> torch.Tensor:
        """``empty`` shaped like ``like``."""
        return self.empty(slot, tuple(like.shape), like.device)


def _wdot(
    w: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, dim: int = 0, keepdim: bool = False
) -> torch.Tensor:
    """Σ_dim w · a · b (w None meaning all ones), using ``out`` (shaped like a) as scratch."""
    torch.mul(a, b, out=out)
    return (out if w is None else out.mul_(w)).sum(dim, keepdim=keepdim)


def _wsum(w: torch.Tensor | None, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Σ_0 w · a."""
    return a.sum(0) if w is None else torch.mul(w, a, out=out).sum(0)


def _safe_inv(s: torch.Tensor) -> torch.Tensor:
    """1 / s, and 0 where s is 0 (a zero scale makes every code decode to the same value) or so small that 1 / s
    would overflow float32 (such a scale ends up as an fp16 zero anyway)."""
    return torch.where(s.abs() > 1e-35, s.reciprocal(), 0.0)


def _safe_div(num: torch.Tensor, den: torch.Tensor, default: torch.Tensor | float) -> torch.Tensor:
    """num / den where den > 0, else ``default`` (the lanes dropped by where() may hold inf or NaN)."""
    return torch.where(den > 0, num / den, default)


def _to_f16(s: torch.Tensor) -> torch.Tensor:
    """float32 -> float16, saturating instead of overflowing to inf."""
    return s.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def _to_f16_nz(s: torch.Tensor) -> torch.Tensor:
    """As _to_f16, but a non-zero scale that would underflow to 0 becomes the smallest fp16 subnormal of its sign
    (a super-block scale of 0 would zero every sub-block, however large its integer scale)."""
    h = _to_f16(s)
    return torch.where((h == 0) & (s != 0), torch.sign(s) * 2.0**-24, h.float()).to(torch.float16)


def _signed_absmax(x: torch.Tensor, dim: int = 0, keepdim: bool = False) -> torch.Tensor:
    """The element of largest magnitude along ``dim``, with its sign (the positive one on a tie). [n, ...] -> [...]."""
    hi, lo = x.amax(dim, keepdim=keepdim), x.amin(dim, keepdim=keepdim)
    return torch.where(hi >= -lo, hi, lo)


def _levels_into(x: torch.Tensor, iscale: torch.Tensor, lv: _Levels, buf: torch.Tensor) -> torch.Tensor:
    """Nearest levels of x · iscale, computed in ``buf`` (uniform grids) or a new tensor (codebooks)."""
    return _levels_of(torch.mul(x, iscale, out=buf), lv)


def _sq_err_sym(
    x: torch.Tensor, w: torch.Tensor | None, a: torch.Tensor, lv: _Levels, buf: torch.Tensor, prod: torch.Tensor
) -> torch.Tensor:
    """Σ_0 w (x − a·level)² with nearest levels for per-(sub-)block scales a (formed as the dequantizer forms them)."""
    v = _levels_into(x, _safe_inv(a), lv, buf)
    r = torch.sub(x, torch.mul(v, a, out=prod), out=prod)
    return _wdot(w, r, r, out=prod)


class _Best:
    """Running per-position minimum over candidates, carrying payload tensors along.

    Bool masks, where() and argmin over a stacked candidate dimension are all several times slower in torch (CPU) than
    plain arithmetic, so the winner is blended in arithmetically: with m = min(best, new), sign(best − m) is 1 where
    the new candidate is strictly better and 0 elsewhere (ties keep the earlier one). Values must be finite.
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None
        self.payload: list[torch.Tensor] = []

    def update(self, value: torch.Tensor, *payload: torch.Tensor) -> None:
        if self.value is None:
            self.value = value.clone()
            self.payload = [p.clone() for p in payload]
            return
        m = torch.minimum(self.value, value)
        take = (self.value - m).sign_()
        self.value = m
        for cur, new in zip(self.payload, payload):
            cur.addcmul_(take, new - cur)


_BIG = 3.0e38


def _span(k: int, lo: float, hi: float) -> tuple[float, ...]:
    """k evenly spaced candidate positions from lo to hi."""
    return tuple(round(lo + (hi - lo) * i / (k - 1), 4) for i in range(k))


# Candidates for rounding the sub-block scales of one super-block (16 or 8 numbers).
_C_SUB = _span(5, -1.0, 1.0)


@dataclass(frozen=True)
class _Cfg:
    """Search effort for one type (tuned on gaussian, heavy-tailed and real weights, with and without importance)."""

    cands: tuple[float, ...]  # stage 1: where the extreme element lands, in level spacings from the end level
    rounds: int = 1  # stage 2: least-squares super-block rescale + integer re-pick rounds
    spread: int = 1  # stage 2: integer sub-block scales (and mins) tried on each side of the rounded one
    lloyd: int = 2  # stage 1: Lloyd iterations after the candidate search
    shifts: tuple[float, ...] = (0.0,)  # stage 1, affine grids: bottom clipping, in level spacings
    d_trials: int = 1  # stage 2: super-block scales tried around the first one, 1/128 apart
    exact: bool = False  # stage 1, symmetric grids: the exact optimum (_exact_inv_scale) is a trial too
    wide_end: bool = False  # stage 1, symmetric grids: the largest element goes to the wider end level only


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: continuous (sub-)block scales
# --------------------------------------------------------------------------------------------------------------------


# A (sub-)block takes the exact search when its largest column importance is at least this many times its mean:
# on SmolLM2 with a WikiText-2 imatrix, ≥ 8 picks 24 % of Q4_0 blocks holding 94 % of the search's gain and 4.5 % of
# Q3_K sub-blocks holding 99 % (elsewhere the trials and Lloyd steps already come within ~0.2 % of the optimum).
_EXACT_CONCENTRATION = 8.0
_EXACT_ENTRIES = 1 << 21  # breakpoints sorted at once by _exact_inv_scale (~100 MB of temporaries)


def _pick_interval(
    t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, live: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best prefix of sorted steps: t [m, k] step positions (ascending, inf = none), a, b [m, k] float64 running
    Σw x v and Σw v² after each step, live [m, k] the steps that exist (None: all). -> ((Σw x v)²/Σw v² [m] float64
    (−1 where no step exists), a point strictly inside the winning interval [m]: halfway to the next step, or past
    the last one)."""
    ok = torch.isfinite(t) if live is None else torch.isfinite(t) & live
    val = torch.where(ok, a.square_().div_(b.clamp_(min=1e-300)), -1.0)
    v, j = val.max(dim=1)
    t_j = t.gather(1, j[:, None]).squeeze(1)
    t_n = t.gather(1, (j + 1).clamp(max=t.shape[1] - 1)[:, None]).squeeze(1)
    t_n = torch.where(torch.isfinite(t_n) & (j + 1 < t.shape[1]), t_n, 3.0 * t_j)
    return v, 0.5 * (t_j + t_n)


@functools.lru_cache(maxsize=16)
def _codebook_steps(codebook: tuple[int, ...]) -> tuple[float, tuple[tuple[float, ...], ...]]:
    """Nearest-level steps of a codebook away from its entry nearest 0 (c0): (c0, (up, down)), each side a tuple of
    (|midpoint|, |Δlevel|, Δlevel²) rows in the order a growing |x·t| meets them."""
    c = sorted(codebook)
    z = min(range(len(c)), key=lambda i: abs(c[i]))
    up = tuple((abs(c[k] + c[k + 1]) / 2, c[k + 1] - c[k], c[k + 1] ** 2 - c[k] ** 2) for k in range(z, len(c) - 1))
    down = tuple((abs(c[k] + c[k - 1]) / 2, c[k] - c[k - 1], c[k - 1] ** 2 - c[k] ** 2) for k in range(z, 0, -1))
    return float(c[z]), (up, down)


def _exact_inv_scale(x: torch.Tensor, w: torch.Tensor, lv: _Levels) -> torch.Tensor:
    """The inverse scale whose nearest levels give the least weighted error, exactly.

    x, w float32 [n, ...]. Returns the inverse scale [...] (a point inside the winning interval).

    For codes v fixed, the least-squares scale leaves Σw x² − (Σw x v)² / Σw v². As the inverse scale t grows from 0,
    element i's nearest level moves away from 0 one step at a time, at t = (k + ½)/|x_i| for k = 0, 1, … until it
    reaches the grid's end on its side, and each step adds w_i|x_i| to Σw x v and w_i(2k + 1) to Σw v². Sorting a
    block's steps and summing them in order therefore visits every set of nearest levels the block can have; the
    largest (Σw x v)² / Σw v² among them is the global optimum that the trial search only approaches (it matters most
    where a few columns carry most of the importance). t < 0 is searched the same way: the grids are not symmetric.
    A codebook (IQ4) steps at the midpoints between its entries, starting from its entry nearest 0. Costs a sort of
    n × (levels per side) keys per block, so only the narrow grids use it.
    """
    n = x.shape[0]
    rest = x.shape[1:]
    xt, wt = x.reshape(n, -1).T, w.reshape(n, -1).T
    m_all = xt.shape[0]
    out = torch.zeros(m_all, dtype=x.dtype, device=x.device)
    if lv.codebook is None:
        k_max = max(-lv.lo, lv.hi)
    else:
        c0, sides = _codebook_steps(lv.codebook)
        k_max = max(len(sides[0]), len(sides[1]))
        pad = [list(side) + [(math.inf, 0.0, 0.0)] * (k_max - len(side)) for side in sides]
        tables = torch.tensor(pad, dtype=x.dtype, device=x.device)  # [2 (up, down), k_max, 3]
    step = max(1, _EXACT_ENTRIES // (n * k_max))
    k = torch.arange(k_max, dtype=x.dtype, device=x.device)
    for m0 in range(0, m_all, step):
        xs, ws_ = xt[m0 : m0 + step], wt[m0 : m0 + step]
        m = xs.shape[0]
        ax = xs.abs()
        best_val = torch.full((m,), -1.0, dtype=torch.float64, device=x.device)
        best_t = torch.zeros(m, dtype=x.dtype, device=x.device)
        if lv.codebook is None:
            # Every element's k_max steps, sorted once: the two signs differ only in which steps exist (an element
            # stops at hi on the side of the scale's sign, at |lo| on the other), and a missing step adds nothing.
            t = torch.where(ax[..., None] > 0, (k + 0.5) / ax.clamp(min=1e-30)[..., None], torch.inf).reshape(m, -1)
            t, order = t.sort(dim=1)
            elem = order // k_max  # the element of each sorted step, and its step number
            kk = (order - elem * k_max).to(x.dtype)
            w_s = ws_.gather(1, elem)
            a_step = (ax * ws_).gather(1, elem).double()  # Σw x v gained per step
            b_step = (2 * kk + 1).mul_(w_s).double()  # Σw v² gained per step
            pos = (xs > 0).gather(1, elem)
            for sign in (1.0, -1.0):
                up, down = (lv.hi, -lv.lo) if sign > 0 else (-lv.lo, lv.hi)
                live = kk < torch.where(pos, float(up), float(down))
                # float64 sums: the optimum's (Σw x v)²/Σw v² sits within ~1e-6 of Σw x², its neighbours closer still
                a = torch.where(live, a_step, 0.0).cumsum_(1)
                b = torch.where(live, b_step, 0.0).cumsum_(1)
                v, t_mid = _pick_interval(t, a, b, live)
                take = v > best_val
                best_val = torch.where(take, v, best_val)
                best_t = torch.where(take, t_mid * sign, best_t)
        else:
            wsum = ws_.sum(1).double()
            for sign in (1.0, -1.0):
                # the side an element climbs depends on the sign of x·t: a separate sort per sign
                side = (sign * xs <= 0).long()  # 0: up, 1: down
                tab = tables[side]  # [m, n, k_max, 3]
                t = (tab[..., 0] / ax.clamp(min=1e-30)[..., None]).masked_fill_((ax == 0)[..., None], torch.inf)
                t, order = t.reshape(m, -1).sort(dim=1)
                a_step = tab[..., 1] * (ax * ws_)[..., None]
                b_step = tab[..., 2] * ws_[..., None]
                a0 = c0 * (sign * xs * ws_).sum(1).double()
                a = a_step.reshape(m, -1).gather(1, order).double().cumsum_(1).add_(a0[:, None])
                b = b_step.reshape(m, -1).gather(1, order).double().cumsum_(1).add_((c0 * c0 * wsum)[:, None])
                v, t_mid = _pick_interval(t, a, b)
                take = v > best_val
                best_val = torch.where(take, v, best_val)
                best_t = torch.where(take, t_mid * sign, best_t)
        out[m0 : m0 + step] = best_t
    return out.reshape(rest)


def _fit_sym(
    x: torch.Tensor,
    w: torch.Tensor | None,
    lv: _Levels,
    cands: tuple[float, ...],
    n_lloyd: int,
    ws: _Ws,
    exact: bool = False,
    wide_end: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s minimising Σ_0 w (x − s·level)² with nearest levels, for every position of dims 1..

    x float32 [n, ...]; w like x, or None. ``cands``: positions of the largest-magnitude element relative to each
    anchor level of ``lv`` (in level spacings; the grid's range clips). Returns (s, svv) [...] with svv = Σ w·level²
    for the final codes, the error's curvature in s (it weights the rounding of sub-block scales). s may be negative:
    the grids are not symmetric (-8..7), and its sign picks the end the largest element lands on. ``exact``: the
    global optimum over every set of nearest levels (``_exact_inv_scale``) joins the trials.
    """
    buf, prod = ws.get("a", x), ws.get("b", x)
    wx = x if w is None else torch.mul(w, x, out=ws.get("wx", x))
    hi, lo = x.amax(0), x.amin(0)
    mx = torch.where(hi >= -lo, hi, lo)
    inv_mx = _safe_inv(mx)
    best = _Best()

    def trial(iscale: torch.Tensor) -> None:
        v = _levels_into(x, iscale, lv, buf)
        sxv = torch.mul(wx, v, out=prod).sum(0)
        svv = _wdot(w, v, v, out=prod)
        # Σw x² − (Σw x v)² / Σw v² is the error at the best scale for these codes: maximise the subtracted term.
        # (Σw v² = 0 only when every v is 0, and then Σw x v = 0 as well.)
        best.update(sxv.square_().div_(svv.clamp_(min=1e-30)).neg_(), iscale)

    anchors = lv.anchors()
    if wide_end:
        anchors = [max(anchors, key=lambda a: abs(a[0]))]
    for anchor, step in anchors:
        for t in cands:
            trial((anchor + t * step) * inv_mx)
    if exact and w is not None:
        # Only (sub-)blocks whose importance sits in a few columns gain from it, so only they pay for its sort.
        flat_w = w.reshape(w.shape[0], -1)
        sel = (flat_w.amax(0) >= _EXACT_CONCENTRATION * flat_w.mean(0)).nonzero().squeeze(1)
        if sel.numel():
            iscale = best.payload[0].clone()
            iscale.view(-1)[sel] = _exact_inv_scale(x.reshape(x.shape[0], -1)[:, sel], flat_w[:, sel], lv)
            trial(iscale)
    inv_s = best.payload[0]
    s = torch.zeros_like(inv_s)
    svv = s
    for _ in range(n_lloyd + 1):
        # Nearest codes for the scale, then the least-squares scale for those codes: the error never rises.
        v = _levels_into(x, inv_s, lv, buf)
        sxv = torch.mul(wx, v, out=prod).sum(0)
        svv = _wdot(w, v, v, out=prod)
        s = _safe_div(sxv, svv, s)
        inv_s = _safe_inv(s)
    # A constant (sub-)block is exact at every level; float noise would pick one at random, and sub-blocks of one
    # super-block that disagree share a super-block scale badly. Use the level of largest magnitude.
    ext = float(lv.lo if abs(lv.lo) >= abs(lv.hi) else lv.hi)
    const = hi == lo
    s = torch.where(const, mx / ext, s)
    svv = torch.where(const, (float(x.shape[0]) if w is None else w.sum(0)) * (ext * ext), svv)
    return s, svv


def _fit_affine(
    x: torch.Tensor,
    w: torch.Tensor | None,
    nmax: int,
    cands: tuple[float, ...],
    n_lloyd: int,
    nonpos_offset: bool,
    ws: _Ws,
    shifts: tuple[float, ...] = (0.0,),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale s ≥ 0 and offset b minimising Σ_0 w (x − (s·q + b))², q in 0..nmax nearest.

    x float32 [n, ...]; ``cands``: trial inverse scales (nmax + t) / (max − min), each tried with the minimum at code
    −u for u in ``shifts`` (t > 0 clips the top, u > 0 the bottom). ``nonpos_offset`` constrains b ≤ 0
    (K-quants store the offset as −dmin·m with m ≥ 0). Returns (s, b, sqq, sw) [...]: sqq = Σ w q² and sw = Σ w are
    the error's curvatures in s and b.
    """
    buf, prod = ws.get("a", x), ws.get("b", x)
    wx = x if w is None else torch.mul(w, x, out=ws.get("wx", x))
    sw = torch.full_like(x[0], float(x.shape[0])) if w is None else w.sum(0)
    sx = wx.sum(0)
    sxx = torch.mul(wx, x, out=prod).sum(0)
    lo, hi = x.amin(0), x.amax(0)
    if nonpos_offset:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    xs = torch.sub(x, lo, out=ws.get("xs", x))
    inv_rng = _safe_inv(hi - lo)

    def solve(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Least-squares (s, b) for codes q; also Σw q² and the residual error (_BIG where s < 0)."""
        sq = _wsum(w, q, out=prod)
        sqq = _wdot(w, q, q, out=prod)
        sxq = torch.mul(wx, q, out=prod).sum(0)
        det = sw * sqq - sq * sq
        okd = det > 1e-5 * sw * sqq  # float32 sums: smaller determinants are rounding noise
        # All codes equal: the best is the constant block, s is irrelevant.
        s = torch.where(okd, (sw * sxq - sx * sq) / det, 0.0)
        b = torch.where(okd, (sqq * sx - sq * sxq) / det, sx / sw)
        if nonpos_offset:
            clip = b > 0
            s = torch.where(clip, _safe_div(sxq, sqq, 0.0), s)
            b = b.clamp(max=0.0)
        # Least-squares residual Σw x² − s·Σw x q − b·Σw x (normal equations); it holds for the clipped branch too.
        err = torch.where(s >= 0, sxx - s * sxq - b * sx, _BIG)
        return s, b, sqq, err

    best = _Best()
    for t in cands:
        for u in shifts:
            q = torch.mul(xs, (nmax + t) * inv_rng, out=buf)
            q = (q.sub_(u) if u else q).round_().clamp_(0, nmax)
            s, b, _, err = solve(q)
            best.update(err, s, b)
    s, b = best.payload
    sqq = torch.zeros_like(s)
    for _ in range(n_lloyd + 1):
        q = torch.sub(x, b, out=buf).mul_(_safe_inv(s)).round_().clamp_(0, nmax)
        s2, b2, sqq, _ = solve(q)
        ok = s2 >= 0
        s, b = torch.where(ok, s2, s), torch.where(ok, b2, b)
    # Constant (sub-)blocks, exact in many ways: pick one canonically (see _fit_sym) -- all codes at nmax for a
    # positive constant under a non-positive offset, else the offset alone.
    c = x[0]
    const = x.amax(0) == x.amin(0)
    top = const & (c > 0) if nonpos_offset else torch.zeros_like(const)
    s = torch.where(top, c / nmax, torch.where(const, 0.0, s))
    b = torch.where(top, 0.0, torch.where(const, c, b))
    sqq = torch.where(top, sw * (nmax * nmax), sqq)
    return s, b, sqq, sw


# --------------------------------------------------------------------------------------------------------------------
# Stage 2: fp16 super-block scales and integer sub-block scales
# --------------------------------------------------------------------------------------------------------------------


def _round_subscales(s: torch.Tensor, sens: torch.Tensor, lo: int, hi: int, ws: _Ws) -> torch.Tensor:
    """Super-block scale d for sub-block scales s [S, B] stored as integers in [lo, hi]: min Σ_j sens_j (s_j − d·k_j)².

    Stage 1's search again, over the S sub-block scales of each block. Returns d [B] (float32).
    """
    d, _ = _fit_sym(s, sens, _Levels(lo, hi), _C_SUB, 2, ws)
    return d


def _subscales_sym(
    x: torch.Tensor,
    w: torch.Tensor | None,
    s: torch.Tensor,
    d: torch.Tensor,
    lv: _Levels,
    lo: int,
    hi: int,
    spread: int,
    ws: _Ws,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block, the integer scale in round(s / d) ± spread with the lowest true error. -> (sc, err) [S, B]."""
    buf, prod = ws.get("a", x), ws.get("b", x)
    c = (s * _safe_inv(d)).round_()
    best = _Best()
    for k in [0] + [k for k in range(-spread, spread + 1) if k]:
        sc = (c + k).clamp_(lo, hi)
        best.update(_sq_err_sym(x, w, d * sc, lv, buf, prod), sc)
    # A zero scale (everything decodes to 0) is always available: no sub-block ends worse than that.
    best.update(_wdot(w, x, x, out=prod), torch.zeros_like(c))
    return best.payload[0], best.value


def _d_trials(d: torch.Tensor, n: int) -> list[torch.Tensor]:
    """n super-block scales around d, 1/128 apart (d itself first), rounded to fp16 and back."""
    ks = sorted(range(-(n // 2), n // 2 + 1), key=abs)
    return [_to_f16_nz(d * (1 + k / 128)).float() for k in ks]


def _refine_sym_k(
    x: torch.Tensor,
    w: torch.Tensor | None,
    s: torch.Tensor,
    d: torch.Tensor,
    lv: _Levels,
    lo: int,
    hi: int,
    cfg: _Cfg,
    ws: _Ws,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-level symmetric fields: value = (d·sc_j)·level, d fp16, sc_j integer in [lo, hi].

    x [n, S, B]; s [S, B] continuous sub-block scales; d [B] first super-block scale.
    Returns (d16 float16 [B], sc float32 [S, B] holding integers), the lowest true error found.
    """
    n_rounds, spread = cfg.rounds, cfg.spread
    if cfg.d_trials > 1:
        # Which super-block scale lets the sub-block scales round well is decided by the true error (with plain
        # rounding of each sub-block scale), over a few scales around the least-squares one.
        best = _Best()
        for dt in _d_trials(d, cfg.d_trials):
            best.update(_subscales_sym(x, w, s, dt, lv, lo, hi, 0, ws)[1].sum(0), dt)
        d = best.payload[0]
    d16 = _to_f16_nz(d)
    sc, err_j = _subscales_sym(x, w, s, d16.float(), lv, lo, hi, spread, ws)
    err = err_j.sum(0)
    for _ in range(n_rounds):
        # Least-squares super-block scale for the chosen integers and codes, then re-pick integers and codes.
        p = _levels_into(x, _safe_inv(d16.float() * sc), lv, ws.get("c", x)).mul_(sc)
        num = _wdot(w, x, p, out=ws.get("d", x)).sum(0)
        den = _wdot(w, p, p, out=ws.get("d", x)).sum(0)
        d_new16 = _to_f16_nz(_safe_div(num, den, d16.float()))
        sc_n, err_j_n = _subscales_sym(x, w, s, d_new16.float(), lv, lo, hi, spread, ws)
        err_n = err_j_n.sum(0)
        better = err_n < err
        d16 = torch.where(better, d_new16, d16)
        sc = torch.where(better, sc_n, sc)
        err = torch.where(better, err_n, err)
    return d16, sc


def _subscales_affine(
    x: torch.Tensor,
    w: torch.Tensor | None,
    s: torch.Tensor,
    mn: torch.Tensor,
    d: torch.Tensor,
    dm: torch.Tensor,
    nmax: int,
    sc_max: int,
    spread: int,
    ws: _Ws,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sub-block integers (sc, m) in [0, sc_max] around (s / d, mn / dm) with the lowest true error.

    value = (d·sc)·q − (dm·m), q in 0..nmax nearest. The scale is searched with m at its rounding, then m with
    the chosen scale (4·spread + 1 trials instead of (2·spread + 1)²). Returns (sc, m, err) [S, B].
    """
    buf, prod = ws.get("a", x), ws.get("b", x)

    def err_of(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        a = d * sc
        y = torch.add(x, dm * m, out=buf)
        q = torch.mul(y, _safe_inv(a), out=prod).round_().clamp_(0, nmax)
        r = y.sub_(q.mul_(a))
        return _wdot(w, r, r, out=prod)

    c = (s * _safe_inv(d)).round_().clamp_(0, sc_max)
    cm = (mn * _safe_inv(dm)).round_().clamp_(0, sc_max)
    best = _Best()
    best.update(err_of(c, cm), c, cm)
    ks = [k for k in range(-spread, spread + 1) if k]
    for k in ks:
        sc = (c + k).clamp_(0, sc_max)
        best.update(err_of(sc, cm), sc, cm)
    sc = best.payload[0].clone()
    for k in ks:
        m = (cm + k).clamp_(0, sc_max)
        best.update(err_of(sc, m), sc, m)
    # Scale and min 0 (everything decodes to 0) is always available: no sub-block ends worse than that.
    zero = torch.zeros_like(c)
    best.update(_wdot(w, x, x, out=prod), zero, zero)
    return best.payload[0], best.payload[1], best.value


def _refine_affine_k(
    x: torch.Tensor,
    w: torch.Tensor | None,
    s: torch.Tensor,
    mn: torch.Tensor,
    d: torch.Tensor,
    dm: torch.Tensor,
    nmax: int,
    sc_max: int,
    cfg: _Cfg,
    ws: _Ws,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-level affine fields: value = (d·sc_j)·q − (dmin·m_j); d, dmin fp16 ≥ 0; sc_j, m_j in [0, sc_max].

    x [n, S, B]; s, mn [S, B] continuous sub-block scales and (non-negative) mins; d, dm [B] first super-block
    scales. Returns (d16, dmin16 float16 [B], sc, m float32 [S, B] holding integers), the lowest true error found.
    """
    n_rounds, spread = cfg.rounds, cfg.spread
    if cfg.d_trials > 1:
        # As in _refine_sym_k: pick the super-block scale by the true error with rounded sub-block scales and mins.
        best = _Best()
        dmf = _to_f16_nz(dm).float()
        for dt in _d_trials(d, cfg.d_trials):
            best.update(_subscales_affine(x, w, s, mn, dt, dmf, nmax, sc_max, 0, ws)[2].sum(0), dt)
        d = best.payload[0]
    d16, dm16 = _to_f16_nz(d), _to_f16_nz(dm)
    sc, m, err_j = _subscales_affine(x, w, s, mn, d16.float(), dm16.float(), nmax, sc_max, spread, ws)
    err = err_j.sum(0)
    sw = torch.full_like(s, float(x.shape[0])) if w is None else w.sum(0)
    sx = _wsum(w, x, out=ws.get("d", x))
    for _ in range(n_rounds):
        df, dmf = d16.float(), dm16.float()
        a = df * sc
        q = torch.add(x, dmf * m, out=ws.get("c", x)).mul_(_safe_inv(a)).round_().clamp_(0, nmax)
        # Joint least squares for (d, dmin) over the super-block: x ≈ d·(sc·q) − dmin·m.
        p = q.mul_(sc)
        scratch = ws.get("d", x)
        spp = _wdot(w, p, p, out=scratch).sum(0)
        spm = (_wsum(w, p, out=scratch) * m).sum(0)
        sxp = _wdot(w, x, p, out=scratch).sum(0)
        smm = (sw * m * m).sum(0)
        sxm = (sx * m).sum(0)
        det = spp * smm - spm * spm
        okd = det > 1e-5 * spp * smm
        d2 = (sxp * smm - sxm * spm) / det
        dm2 = (sxp * spm - sxm * spp) / det
        # Without usable mins (all m = 0, or a singular system) only d is refitted.
        use2 = okd & (dm2 >= 0) & (d2 > 0)
        d2 = torch.where(use2, d2, _safe_div(sxp, spp, df))
        dm2 = torch.where(use2, dm2, dmf)
        d_new16, dm_new16 = _to_f16_nz(d2.clamp(min=0.0)), _to_f16_nz(dm2)
        sc_n, m_n, err_j_n = _subscales_affine(x, w, s, mn, d_new16.float(), dm_new16.float(), nmax, sc_max, spread, ws)
        err_n = err_j_n.sum(0)
        better = err_n < err
        d16 = torch.where(better, d_new16, d16)
        dm16 = torch.where(better, dm_new16, dm16)
        sc = torch.where(better, sc_n, sc)
        m = torch.where(better, m_n, m)
        err = torch.where(better, err_n, err)
    return d16, dm16, sc, m


# --------------------------------------------------------------------------------------------------------------------
# Per-type fitters on a chunk: x float32 [n, S, B] (working layout), w like x or None
# --------------------------------------------------------------------------------------------------------------------


def _blocks(codes: torch.Tensor) -> torch.Tensor:
    """Working layout [n, S, B] -> natural block order [B, S·n]."""
    n, s, b = codes.shape
    return codes.permute(2, 1, 0).reshape(b, s * n)


def _fit_sym_single(
    x: torch.Tensor,
    w: torch.Tensor | None,
    lv: _Levels,
    cfg: _Cfg,
    ref_div: float | None,
    ws: _Ws,
    q_dtype: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp16 scale per block: value = d·level. x [n, 1, B] -> (d float16 [B], codes ``q_dtype`` [B, n]).

    ``ref_div``: llama.cpp's reference choice, d = (signed max) / ref_div (amax / ref_div when positive), which a
    block keeps where it is at least as good.
    """
    buf, prod = ws.get("a", x), ws.get("b", x)
    s, _ = _fit_sym(x, w, lv, cfg.cands, cfg.lloyd, ws, cfg.exact)
    best = _Best()
    d16 = _to_f16_nz(s)
    best.update(_sq_err_sym(x, w, d16.float(), lv, buf, prod), d16.float())
    # One more Lloyd step on the stored (rounded) scale, kept where it helps.
    v = _levels_into(x, _safe_inv(d16.float()), lv, ws.get("c", x))
    d2 = _to_f16_nz(_safe_div(_wdot(w, x, v, out=prod), _wdot(w, v, v, out=prod), d16.float())).float()
    best.update(_sq_err_sym(x, w, d2, lv, buf, prod), d2)
    # d = 0 (all zeros) bounds every block's error by Σ w x².
    best.update(_wdot(w, x, x, out=prod), torch.zeros_like(d2))
    if ref_div is not None:
        mx = _signed_absmax(x)
        ref = _to_f16((mx if ref_div < 0 else mx.abs()) / ref_div).float()
        best.update(_sq_err_sym(x, w, ref, lv, buf, prod), ref)
    d = best.payload[0]
    codes = _codes_of(x * _safe_inv(d), lv, q_dtype)
    return d.to(torch.float16).squeeze(0), _blocks(codes)


def _sym_ls(
    x: torch.Tensor, w: torch.Tensor | None, q: torch.Tensor, ws: _Ws, err: ErrorSums | None, t: GGMLType
) -> torch.Tensor:
    """Effort "fast" for the one-scale symmetric types (Q8_0, Q4_0, Q5_0), in natural block layout: x float32
    [rows, n / 32, 32] (whole rows), w like x or None, stored codes written into q [rows · n / 32, 32] (``lv``'s
    codes, the level plus its zero); returns d float16 [rows · n / 32]. With ``err``, adds this chunk's
    reconstruction error. Raises ValueError for a non-finite weight.

    llama.cpp's scale r (amax / ref_div, or the signed largest element / ref_div for a negative ref_div) gives
    codes v = round(x / r); the least-squares scale for those codes, rounded to fp16 (d, the fp16 value nearest the
    optimum, hence never further from it than r), then the nearest codes for d. Each step can only lower
    Σ w (x − d·level)² (a quadratic in d for fixed codes; clamped nearest rounding per element for fixed d), so every
    block ends at or below llama.cpp's own error — with no error evaluated at all, which keeps this to about a dozen
    passes over the weights.

    Cost notes (2-core CPU, 512K-element chunks): every block-sized temporary comes from ``ws`` (a fresh
    multi-megabyte tensor costs its page faults, several times the arithmetic done on it), and the per-block
    tensors avoid bool masks where they can (``where`` costs ~25 µs even on 16K elements, as much as a pass over
    the chunk).
    """
    lv, ref_div, _ = _LS_TYPES[t]
    rows = x.shape[0]
    x, w = x.view(-1, 32), None if w is None else w.view(-1, 32)
    v, prod = ws.get("v", x), ws.get("p", x)
    # The reference scale's block statistic: amax, or the signed largest element (whose magnitude is amax)
    mx = torch.abs(x, out=prod).amax(1, keepdim=True) if ref_div > 0 else _signed_absmax(x, dim=1, keepdim=True)
    top = float(mx.abs().max())  # NaN and inf propagate into it: the finiteness check costs no pass of its own
    if not math.isfinite(top):
        raise ValueError(f"{t.name}: weights contain NaN or inf")
    if top > _X_MAX:
        x.clamp_(-_X_MAX, _X_MAX)
        mx.clamp_(-_X_MAX, _X_MAX)
    ref = _to_f16(mx / ref_div).float()
    torch.mul(x, ref.reciprocal().nan_to_num_(posinf=0.0, neginf=0.0), out=v).round_().clamp_(lv.lo, lv.hi)
    xv = _wdot(w, x, v, prod, dim=1, keepdim=True)
    vv = _wdot(w, v, v, prod, dim=1, keepdim=True)
    # |Σ x·v| ≥ |r|·Σ v² / 2 (|x/r − v| ≤ ½ and |v| ≤ v²), so |d| ≥ |r|/2 with r's sign; the floor at fp16's smallest
    # subnormal keeps a non-zero block from a zero scale (and gives a block too small for r its nearest codes).
    d_ls = xv.div_(vv).nan_to_num_(nan=0.0)
    d = torch.copysign(d_ls.abs().clamp_(2.0**-24, _FP16_MAX), d_ls).to(torch.float16)
    df = d.float()
    torch.mul(x, df.reciprocal(), out=v).round_().clamp_(lv.lo, lv.hi)
    q.view(torch.int8).copy_(v)  # levels fit int8; float→int8 is the fast cast (see _small_u8)
    if lv.zero:
        q.add_(lv.zero)  # wraps to the stored codes (uint8)
    if err is not None:  # the dequantized chunk is level · d in float32, exactly as every reader forms it
        err.add(v.mul_(df).sub_(x).view(rows, -1), x.view(rows, -1))
    return d.squeeze(1)


def _fit_sym_ls(x: torch.Tensor, t: GGMLType, wcol: torch.Tensor | None, err: ErrorSums | None) -> BlockFields:
    """``fit`` at effort "fast" for the types of ``_LS_TYPES``: x [rows, n] (any float dtype; not modified), wcol
    float32 [n] (the fit's weights) or None. Row chunks that stay in cache, written straight into the result (no
    per-chunk fields to concatenate); ``err`` collects the reconstruction error."""
    cls = _LS_TYPES[t][2]
    rows, n = x.shape
    nbpr = n // 32
    d = torch.empty(rows * nbpr, dtype=torch.float16, device=x.device)
    q = torch.empty(rows * nbpr, 32, dtype=_SPECS[t].q_dtype, device=x.device)
    step = max(1, _chunk_elems(x.device) // n)
    wss = thread_local(_Ws)

    def one(r0: int) -> ErrorSums | None:
        ws, part = wss.get(), None if err is None else err.empty()
        r1 = min(rows, r0 + step)
        xc = ws.empty("x", (r1 - r0, nbpr, 32), x.device)
        xc.copy_(x[r0:r1].view(r1 - r0, nbpr, 32))
        wc = None if wcol is None else ws.empty("w", (r1 - r0, nbpr, 32), x.device).copy_(wcol.view(1, nbpr, 32))
        d[r0 * nbpr : r1 * nbpr] = _sym_ls(xc, wc, q[r0 * nbpr : r1 * nbpr], ws, part, t)
        return part

    for part in map_chunks(one, range(0, rows, step), x.device):
        if part is not None:
            err.merge(part)
    return cls(d=d, q=q)


def _fit_affine_single(
    x: torch.Tensor, w: torch.Tensor | None, nmax: int, cfg: _Cfg, ws: _Ws
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp16 d and m per block: value = d·q + m, q in 0..nmax. x [n, 1, B] -> (d, m float16 [B], q uint8 [B, n])."""
    buf, prod = ws.get("a", x), ws.get("b", x)
    s, b, _, sw = _fit_affine(x, w, nmax, cfg.cands, cfg.lloyd, False, ws, cfg.shifts)

    def err_of(d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        y = torch.sub(x, m, out=buf)
        q = torch.mul(y, _safe_inv(d), out=prod).round_().clamp_(0, nmax)
        r = y.sub_(q.mul_(d))
        return _wdot(w, r, r, out=prod)

    d = _to_f16_nz(s).float()
    # With d stored, refit the offset for the codes (the weighted mean residual), store it.
    q = torch.sub(x, b, out=buf).mul_(_safe_inv(d)).round_().clamp_(0, nmax)
    m = _to_f16(_wsum(w, q.mul_(-d).add_(x), out=prod) / sw).float()
    best = _Best()
    best.update(err_of(d, m), d, m)
    # d = m = 0 (all zeros) bounds every block's error by Σ w x².
    zero = torch.zeros_like(d)
    best.update(_wdot(w, x, x, out=prod), zero, zero)
    # llama.cpp's reference: d = (max − min) / nmax, m = min.
    lo, hi = x.amin(0), x.amax(0)
    d_ref, m_ref = _to_f16((hi - lo) / nmax).float(), _to_f16(lo).float()
    best.update(err_of(d_ref, m_ref), d_ref, m_ref)
    d, m = best.payload
    q = torch.sub(x, m).mul_(_safe_inv(d)).round_().clamp_(0, nmax)
    return d.to(torch.float16).squeeze(0), m.to(torch.float16).squeeze(0), _blocks(_small_u8(q))


def _fit_sym_k(
    x: torch.Tensor, w: torch.Tensor | None, lv: _Levels, lo: int, hi: int, cfg: _Cfg, ws: _Ws
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q3_K / Q6_K / IQ4_XS: value = (d·sc_j)·level. x [n, S, B] -> (d16 [B], sc int64 [B, S], codes uint8 [B, S·n])."""
    s, svv = _fit_sym(x, w, lv, cfg.cands, cfg.lloyd, ws, cfg.exact, cfg.wide_end)
    d = _round_subscales(s, svv, lo, hi, ws)
    d16, sc = _refine_sym_k(x, w, s, d, lv, lo, hi, cfg, ws)
    codes = _codes_of(x * _safe_inv(d16.float() * sc), lv)
    return d16, sc.long().T.contiguous(), _blocks(codes)


def _fit_affine_k(
    x: torch.Tensor, w: torch.Tensor | None, nmax: int, sc_max: int, cfg: _Cfg, ws: _Ws
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q2_K / Q4_K / Q5_K. x [n, S, B] -> (d16, dmin16 [B], sc, m int64 [B, S], q uint8 [B, S·n])."""
    s, b, sqq, sw = _fit_affine(x, w, nmax, cfg.cands, cfg.lloyd, True, ws, cfg.shifts)
    mn = -b
    d = _round_subscales(s, sqq, 0, sc_max, ws)
    dm = _round_subscales(mn, sw.expand_as(mn), 0, sc_max, ws)
    d16, dm16, sc, m = _refine_affine_k(x, w, s, mn, d, dm, nmax, sc_max, cfg, ws)
    q = (x + dm16.float() * m).mul_(_safe_inv(d16.float() * sc)).round_().clamp_(0, nmax)
    return d16, dm16, sc.long().T.contiguous(), m.long().T.contiguous(), _blocks(_small_u8(q))


# --------------------------------------------------------------------------------------------------------------------
# Type table
# --------------------------------------------------------------------------------------------------------------------

_LV_Q8_0 = _Levels(-128, 127)
_LV_Q4_0 = _Levels(0, 15, zero=8)
_LV_Q5_0 = _Levels(0, 31, zero=16)
_LV_Q3_K = _Levels(0, 7, zero=4)
_LV_Q6_K = _Levels(0, 63, zero=32)
_LV_IQ4 = _Levels(0, 15, codebook=KVALUES_IQ4NL)
# The one-scale symmetric types with an effort-"fast" path of their own (_sym_ls): levels, llama.cpp's reference
# divisor (of amax when positive, of the signed largest element when negative) and the fields.
_LS_TYPES: dict[GGMLType, tuple[_Levels, float, type]] = {
    GGMLType.Q8_0: (_LV_Q8_0, 127.0, Q8_0Fields),
    GGMLType.Q4_0: (_LV_Q4_0, -8.0, Q4_0Fields),
    GGMLType.Q5_0: (_LV_Q5_0, -16.0, Q5_0Fields),
}

# Search effort per type. Wide candidate ranges matter most with importance (a low-importance extreme element is
# better clipped); the more levels a grid has, the further its extreme element is worth clipping.
_SHIFTS = (0.0, 0.5, 1.0, 1.5)
_CFG: dict[GGMLType, _Cfg] = {
    GGMLType.Q8_0: _Cfg(_span(21, -2.0, 18.0)),
    GGMLType.Q4_0: _Cfg(_span(13, -2.0, 5.0)),
    GGMLType.Q5_0: _Cfg(_span(13, -2.0, 5.0)),
    GGMLType.Q4_1: _Cfg(_span(11, -2.0, 3.0), shifts=_SHIFTS),
    GGMLType.Q5_1: _Cfg(_span(11, -2.0, 3.0), shifts=_SHIFTS),
    GGMLType.IQ4_NL: _Cfg(_span(13, -1.0, 2.0)),
    GGMLType.Q2_K: _Cfg(_span(11, -1.0, 3.0), shifts=_SHIFTS, rounds=2, d_trials=5),
    GGMLType.Q3_K: _Cfg(_span(8, -1.5, 2.7), rounds=0, lloyd=1),
    GGMLType.Q4_K: _Cfg(_span(11, -2.0, 3.0), shifts=_SHIFTS, rounds=2, spread=2, d_trials=9),
    GGMLType.Q5_K: _Cfg(_span(11, -2.0, 3.0), shifts=_SHIFTS, rounds=2, spread=2, d_trials=9),
    GGMLType.Q6_K: _Cfg(_span(11, -2.0, 8.0), d_trials=5),
    GGMLType.IQ4_XS: _Cfg(_span(13, -1.0, 2.0)),
}


# effort "fast": about a third of the trials (a quarter for Q4_K; Q8_0 — and Q4_0, Q5_0 without importance, see
# _CFG_FAST_PLAIN — llama.cpp's scale, one least-squares step and the nearest codes: _sym_ls),
# still at or below llama.cpp's error on the tests' gaussian, heavy-tailed and real (SmolLM2) weights, with and without
# importance (`python tests/ggml_ref.py --effort fast` prints the ratios and the fitting times).
# Q3_K keeps the full search with importance (its margin over llama.cpp is the smallest there).
_CFG_FAST: dict[GGMLType, _Cfg] = {
    **_CFG,
    GGMLType.Q8_0: _Cfg(()),  # no candidates: _sym_ls
    # Gaussian / heavy-tailed / SmolLM2 [576, 1536], error ÷ llama.cpp's: 0.78 / 0.64 / 0.78 (full search 0.76 /
    # 0.62 / 0.76), with importance 0.92 / 0.83 / 0.92 (0.90 / 0.81 / 0.90); fitting time 0.58× llama.cpp's (2.1×).
    GGMLType.Q2_K: _Cfg(_span(4, -1.0, 2.0), shifts=(0.0, 1.0), rounds=0, spread=1, d_trials=1, lloyd=1),
    GGMLType.Q4_0: _Cfg(_span(4, -1.0, 2.0), lloyd=1),
    GGMLType.Q5_0: _Cfg(_span(4, -1.0, 2.0), lloyd=1),
    GGMLType.Q4_1: _Cfg(_span(4, -1.0, 2.0), shifts=(0.0, 1.0), lloyd=1),
    GGMLType.Q5_1: _Cfg(_span(4, -1.0, 2.0), shifts=(0.0, 1.0), lloyd=1),
    GGMLType.IQ4_NL: _Cfg(_span(4, -1.0, 2.0), lloyd=1),
    GGMLType.Q4_K: _Cfg(_span(4, -1.0, 2.0), shifts=(0.0, 1.0), rounds=0, spread=1, d_trials=1, lloyd=1),
    GGMLType.Q5_K: _Cfg(_span(4, -1.0, 2.0), shifts=(0.0, 1.0), rounds=0, spread=1, d_trials=1, lloyd=1),
    GGMLType.Q6_K: _Cfg(_span(3, 0.0, 4.0), d_trials=1, lloyd=1, rounds=0),
    GGMLType.IQ4_XS: _Cfg(_span(4, -1.0, 2.0), lloyd=1),
}
# Without importance, llama.cpp quantizes Q4_0 / Q5_0 by the plain amax rule, which _sym_ls provably matches or
# beats at close to Q8_0's cost (1B model, 2 cores: Q4_0 fast 31 s → 13.5 s, llama-quantize 4.5 s); with
# importance llama.cpp searches its scales, and so does effort "fast" (the _CFG_FAST entries).
# Q3_K without importance: two trials with the largest element at the wide end (−4), error ÷ llama.cpp's 0.94 / 0.96 /
# 0.94 (full search 0.93 / 0.96 / 0.93), fitting time 1.4× llama.cpp's (2.4×); with importance that search would
# end above llama.cpp's (1.04).
_CFG_FAST_PLAIN: dict[GGMLType, _Cfg] = {
    **_CFG_FAST,
    GGMLType.Q4_0: _Cfg(()),
    GGMLType.Q5_0: _Cfg(()),
    GGMLType.Q3_K: _Cfg((0.0, 1.0), rounds=0, lloyd=1, wide_end=True),
    # Q6_K without importance: one trial, no Lloyd step, error ÷ llama.cpp's 0.94 / 0.96 / 0.94 (the three trials of
    # _CFG_FAST: 0.89 / 0.93 / 0.89), fitting time 0.44× llama.cpp's (0.63×); the output matrix of most mixes.
    GGMLType.Q6_K: _Cfg((0.0,), d_trials=1, lloyd=0, rounds=0),
}
# With importance, the symmetric grids of at most 16 levels also take stage 1's exact optimum (_exact_inv_scale).
# Measured on SmolLM2's tensors with a WikiText-2 imatrix: weighted error −10 % for Q3_K, −2 % for Q4_0 (−38 % and
# −10 % on single tensors whose importance sits in a few columns), −0.7 % / −1 % for IQ4_NL / IQ4_XS; KLD of the Q2_K
# mix −3.4 %, of Q4_0 −3.2 % (BENCHMARKS.md, gguf suite). Without importance it gains 0.2 % for 10–30× the fitting
# time; on the wider grids (Q5_0, Q6_K, Q8_0) the sort grows with the level count.
_CFG_IMP: dict[GGMLType, _Cfg] = {
    **_CFG,
    **{
        t: dataclasses.replace(_CFG[t], exact=True)
        for t in (GGMLType.Q4_0, GGMLType.Q3_K, GGMLType.IQ4_NL, GGMLType.IQ4_XS)
    },
}
EFFORTS = ("best", "fast", "auto")
# Types fitted under per-element weights (1 + w²/σ²)^p (σ² the (super-)block's mean square): p without importance,
# p beside the importance, and p beside the importance for the attention's value path (``fit(value_path=True)``: the
# v and o projections), see the module docstring. Measured on SmolLM2's Q2_K mix with an imatrix (Q4_0 for every
# 576-wide tensor, Q3_K ffn_down), KLD on WikiText-2 test / validation, 25 chunks, CPU; llama-quantize on the same
# file and imatrix: 0.3237 / 0.3053.
# - Q3_K, by p (Q4_0 at 0): test 0 → 0.2819, 1/100 → 0.2812, 1/8 → 0.2689, 1/4 → 0.2694, 1/2 → 0.2737, 1 → 0.2798;
#   validation 0 → 0.2509, 1/8 → 0.2395, 1/4 → 0.2425. The importance raised to 0.85 or 1.15 beside p = 1/8: worse on
#   both texts (0.2746 / 0.2442 and 0.2777 / 0.2448).
# - Q4_0 (Q3_K at 1/8: 0.2689 / 0.2395), p on every Q4_0 tensor: 1/2 → +5 % (test), 1/4 → +1 % (test), 1/16 →
#   0.2665 / 0.2427, −1/8 → 0.2620 / 0.2385, −1/4 → 0.2624 / 0.2393; but −1/8 raised the Q3_K_M mix's KLD (whose Q4_0
#   tensors are attn_q/k and ffn_gate/up) by 2.0 % / 1.5 %. By tensor, −1/8: on attn_q/k + ffn_gate/up only 0.2699 /
#   0.2431 (worse), on attn_output only 0.2678 / 0.2386, on attn_v only 0.2626 / 0.2355, on both 0.2612 / 0.2345
#   (−2.9 % / −2.1 %). So only the value path takes it: there a block's large weights count a little *less* than
#   the importance alone says (at most ×0.65, for a lone outlier), and the scale clips them more in favour of the bulk;
#   llama.cpp's importance·sqrt(σ² + w²) goes the other way (the +1/2 row). The same −1/8 for Q5_0 / Q5_1 on the
#   value path (the Q3_K_M mix's attn_v and attn_output): 0.1215 / 0.1130 → 0.1215 / 0.1127, not worth a rule.
SURROGATE_POWER: dict[GGMLType, float] = {GGMLType.Q3_K: 0.5}
SURROGATE_POWER_IMP: dict[GGMLType, float] = {GGMLType.Q3_K: 0.125}
VALUE_PATH_POWER_IMP: dict[GGMLType, float] = {GGMLType.Q4_0: -0.125}


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.uint8)


def _chunk_q8_0(x, w, ws, cfgs=_CFG):
    d, q = _fit_sym_single(x, w, _LV_Q8_0, cfgs[GGMLType.Q8_0], 127.0, ws, torch.int8)
    return Q8_0Fields(d=d, q=q)


def _chunk_q4_0(x, w, ws, cfgs=_CFG):
    d, q = _fit_sym_single(x, w, _LV_Q4_0, cfgs[GGMLType.Q4_0], -8.0, ws)
    return Q4_0Fields(d=d, q=_u8(q))


def _chunk_q5_0(x, w, ws, cfgs=_CFG):
    d, q = _fit_sym_single(x, w, _LV_Q5_0, cfgs[GGMLType.Q5_0], -16.0, ws)
    return Q5_0Fields(d=d, q=_u8(q))


def _chunk_q4_1(x, w, ws, cfgs=_CFG):
    d, m, q = _fit_affine_single(x, w, 15, cfgs[GGMLType.Q4_1], ws)
    return Q4_1Fields(d=d, m=m, q=_u8(q))


def _chunk_q5_1(x, w, ws, cfgs=_CFG):
    d, m, q = _fit_affine_single(x, w, 31, cfgs[GGMLType.Q5_1], ws)
    return Q5_1Fields(d=d, m=m, q=_u8(q))


def _chunk_iq4_nl(x, w, ws, cfgs=_CFG):
    d, q = _fit_sym_single(x, w, _LV_IQ4, cfgs[GGMLType.IQ4_NL], None, ws)
    return IQ4_NLFields(d=d, q=_u8(q))


def _chunk_q2_k(x, w, ws, cfgs=_CFG):
    d, dm, sc, m, q = _fit_affine_k(x, w, 3, 15, cfgs[GGMLType.Q2_K], ws)
    return Q2_KFields(d=d, dmin=dm, sc=_u8(sc), m=_u8(m), q=_u8(q))


def _chunk_q4_k(x, w, ws, cfgs=_CFG):
    d, dm, sc, m, q = _fit_affine_k(x, w, 15, 63, cfgs[GGMLType.Q4_K], ws)
    return Q4_KFields(d=d, dmin=dm, sc=_u8(sc), m=_u8(m), q=_u8(q))


def _chunk_q5_k(x, w, ws, cfgs=_CFG):
    d, dm, sc, m, q = _fit_affine_k(x, w, 31, 63, cfgs[GGMLType.Q5_K], ws)
    return Q5_KFields(d=d, dmin=dm, sc=_u8(sc), m=_u8(m), q=_u8(q))


def _chunk_q3_k(x, w, ws, cfgs=_CFG):
    d, sc, q = _fit_sym_k(x, w, _LV_Q3_K, -32, 31, cfgs[GGMLType.Q3_K], ws)
    return Q3_KFields(d=d, sc=sc.to(torch.int8), q=_u8(q))


def _chunk_q6_k(x, w, ws, cfgs=_CFG):
    d, sc, q = _fit_sym_k(x, w, _LV_Q6_K, -128, 127, cfgs[GGMLType.Q6_K], ws)
    return Q6_KFields(d=d, sc=sc.to(torch.int8), q=_u8(q))


def _chunk_iq4_xs(x, w, ws, cfgs=_CFG):
    d, sc, q = _fit_sym_k(x, w, _LV_IQ4, -32, 31, cfgs[GGMLType.IQ4_XS], ws)
    return IQ4_XSFields(d=d, sc=_u8(sc + 32), q=_u8(q))


@dataclass(frozen=True)
class _Spec:
    """How one GGML type's fields are chosen and how its codes decode (see ``element_grid``)."""

    fit_chunk: Callable[..., BlockFields]  # (x, w, ws, cfgs) -> fields
    levels: _Levels
    sub: int  # elements per sub-block scale
    q_dtype: torch.dtype


_SPECS: dict[GGMLType, _Spec] = {
    GGMLType.Q8_0: _Spec(_chunk_q8_0, _LV_Q8_0, 32, torch.int8),
    GGMLType.Q4_0: _Spec(_chunk_q4_0, _LV_Q4_0, 32, torch.uint8),
    GGMLType.Q4_1: _Spec(_chunk_q4_1, _Levels(0, 15), 32, torch.uint8),
    GGMLType.Q5_0: _Spec(_chunk_q5_0, _LV_Q5_0, 32, torch.uint8),
    GGMLType.Q5_1: _Spec(_chunk_q5_1, _Levels(0, 31), 32, torch.uint8),
    GGMLType.Q2_K: _Spec(_chunk_q2_k, _Levels(0, 3), 16, torch.uint8),
    GGMLType.Q3_K: _Spec(_chunk_q3_k, _LV_Q3_K, 16, torch.uint8),
    GGMLType.Q4_K: _Spec(_chunk_q4_k, _Levels(0, 15), 32, torch.uint8),
    GGMLType.Q5_K: _Spec(_chunk_q5_k, _Levels(0, 31), 32, torch.uint8),
    GGMLType.Q6_K: _Spec(_chunk_q6_k, _LV_Q6_K, 16, torch.uint8),
    GGMLType.IQ4_NL: _Spec(_chunk_iq4_nl, _LV_IQ4, 32, torch.uint8),
    GGMLType.IQ4_XS: _Spec(_chunk_iq4_xs, _LV_IQ4, 32, torch.uint8),
}

SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(_SPECS)


def _spec(ggml_type: int) -> tuple[GGMLType, _Spec]:
    t = GGMLType(ggml_type)
    if t not in _SPECS:
        raise NotImplementedError(f"ggml_grid: no fitter for GGML type {t.name}")
    return t, _SPECS[t]


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------


def _chunk_elems(device: torch.device) -> int:
    """Elements per work chunk: ~2 MB temporaries on CPU (they stay in cache), ~64 MB on accelerators."""
    return 1 << 19 if device.type == "cpu" else 1 << 24


def _check_w(w: torch.Tensor, t: GGMLType) -> tuple[int, int]:
    if w.dim() != 2:
        raise ValueError(f"{t.name}: weights must be 2-D [rows, n], got shape {list(w.shape)}")
    rows, n = w.shape
    if n % BLOCK_SIZE[t]:
        raise ValueError(f"{t.name}: row length {n} is not a multiple of the block size {BLOCK_SIZE[t]}")
    return rows, n


def _gather_fields(parts: Iterator[BlockFields], n_blocks: int) -> BlockFields:
    """Consecutive chunks' fields (every field's leading dim is blocks) into one ``n_blocks``-block tensor each,
    each copied in as it arrives: the copies overlap the chunks still being fitted (a concatenation at the end left
    the workers idle meanwhile). ``parts`` is run to its end (a ``map_chunks`` generator finishes its bookkeeping)."""
    first = next(parts)
    if first.n_blocks == n_blocks:
        if next(parts, None) is not None:
            raise RuntimeError(f"chunks held more than {n_blocks} blocks")
        return first
    names = [f.name for f in dataclasses.fields(first)]
    out = {}
    for k in names:
        t = getattr(first, k)
        out[k] = torch.empty((n_blocks, *t.shape[1:]), dtype=t.dtype, device=t.device)
    at = 0
    for part in itertools.chain([first], parts):
        nb = part.n_blocks
        for k in names:
            out[k][at : at + nb].copy_(getattr(part, k))
        at += nb
    if at != n_blocks:
        raise RuntimeError(f"chunks held {at} blocks, expected {n_blocks}")
    return type(first)(**out)


def fit_with_error(
    w: torch.Tensor,
    ggml_type: int,
    importance: torch.Tensor | None = None,
    effort: str = "best",
    value_path: bool = False,
) -> tuple[BlockFields, dict[str, float] | None]:
    """Choose every field of a GGML tensor of type ``ggml_type`` for the weights ``w``.

    w: float [rows, n] (any float dtype, any device; computed in float32), n a multiple of BLOCK_SIZE[type].
    importance: float [n] ≥ 0 (one value per input column, e.g. llama.cpp's imatrix) or None.
    Returns the type's ``<T>Fields`` for ``rows * n / BLOCK_SIZE`` blocks in row-major order (block b covers row
    ``b // (n / BLOCK_SIZE)``, columns from ``(b % (n / BLOCK_SIZE)) * BLOCK_SIZE``), on ``w.device``. The fields
    (heuristically) minimise Σ importance[col]·(w − dequant)², or Σ (w − dequant)² without importance (weighted by
    (1 + w²/σ²)^p per element for the types in ``SURROGATE_POWER`` / ``SURROGATE_POWER_IMP``).
    value_path: w is on the attention's value path (a v or o projection): with importance, the types in
    ``VALUE_PATH_POWER_IMP`` take that power.
    effort: "best" (the full search), "fast" (about a third of the trials, still below llama.cpp's error), "auto"
    (best with importance weights, fast without).
    Also returns the error statistics of the dequantized result against ``w`` (qconv.quant.tensor.error_stats's keys,
    the weighted figure with ``importance``) where the fit forms them on the way at little cost — Q8_0 at effort
    "fast", whose dequantized chunk is in cache anyway — and None elsewhere (the caller computes them).
    Raises ValueError for a bad shape, a non-finite weight, or a bad importance vector; NotImplementedError for a type
    outside ``SUPPORTED_TYPES``.
    """
    return _fit(w, ggml_type, importance, effort, value_path, want_error=True)


@torch.no_grad()
def _fit(
    w: torch.Tensor,
    ggml_type: int,
    importance: torch.Tensor | None,
    effort: str,
    value_path: bool,
    want_error: bool,
) -> tuple[BlockFields, dict[str, float] | None]:
    if effort not in EFFORTS:
        raise ValueError(f"effort {effort!r}: choose one of {', '.join(EFFORTS)}")
    t, spec = _spec(ggml_type)
    rows, n = _check_w(w, t)
    bs = BLOCK_SIZE[t]
    # Converted to float32 one chunk at a time: a full float32 copy of a 32000 × 5120 output matrix alone is 655 MB.
    x = w.detach()
    wcol = None
    if importance is not None:
        imp = importance.detach().to(device=x.device, dtype=torch.float32).reshape(-1)
        if imp.numel() != n or not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise ValueError(f"{t.name}: importance must be finite, non-negative, of shape [{n}]")
        mean = float(imp.mean()) if n else 0.0
        if mean > 0:
            # Normalised (the error's scale is irrelevant to the argmin), with a tiny floor so that zero-importance
            # columns cannot make a least-squares system singular.
            wcol = imp / mean + 1e-6
    if effort == "best" or (effort == "auto" and importance is not None):
        cfgs = _CFG if wcol is None else _CFG_IMP
    else:
        cfgs = _CFG_FAST if wcol is not None else _CFG_FAST_PLAIN
    if rows * n == 0:
        return unpack(torch.zeros(0, TYPE_SIZE[t], dtype=torch.uint8, device=x.device), t), None
    if t in _LS_TYPES and not cfgs[t].cands:
        err = ErrorSums(importance, x.device) if want_error else None
        fields = _fit_sym_ls(x, t, wcol, err)
        return fields, None if err is None else err.stats()
    nbpr, sub = n // bs, spec.sub
    n_sub = bs // sub
    # Working layout [sub, n_sub, blocks] (see "Working layout" above); the weights of one row of blocks likewise.
    wrow = None if wcol is None else wcol.reshape(nbpr, n_sub, sub).permute(2, 1, 0)
    rows_per_chunk = max(1, _chunk_elems(x.device) // n)
    wss = thread_local(_Ws)

    def one(r0: int) -> BlockFields:
        ws = wss.get()
        xc = x[r0 : r0 + rows_per_chunk]
        r = xc.shape[0]
        shape = (sub, n_sub, r * nbpr)
        xt = ws.empty("x", shape, x.device)
        # Widened to float32 in the same pass that reorders (no float32 copy of the chunk in between)
        xt.view(sub, n_sub, r, nbpr).copy_(xc.reshape(r, nbpr, n_sub, sub).permute(3, 2, 0, 1))
        if count_nonfinite(xt):
            raise ValueError(f"{t.name}: weights contain NaN or inf")
        # No type reaches past ~1.3e8 (fp16 scale × largest level); clamping far beyond that keeps every square and
        # product below float32's range without changing what can be represented.
        xt.clamp_(-_X_MAX, _X_MAX)
        wt = None
        if wrow is None:
            power = SURROGATE_POWER.get(t)
        else:
            power = SURROGATE_POWER_IMP.get(t)
            if value_path:
                power = VALUE_PATH_POWER_IMP.get(t, power)
        if power is not None:
            # (1 + w²/σ²)^p: σ² per (super-)block, which fits independently, so weights never underflow; the layout's
            # first two dims are a block's elements
            wt = torch.square(xt, out=ws.empty("w", shape, x.device))
            wt.div_(wt.mean(dim=(0, 1), keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)).add_(1.0)
            wt.sqrt_() if power == 0.5 else wt.pow_(power)
            if wrow is not None:
                wt.view(sub, n_sub, r, nbpr).mul_(wrow.unsqueeze(2))
        elif wrow is not None:
            wt = ws.empty("w", shape, x.device)
            wt.view(sub, n_sub, r, nbpr).copy_(wrow.unsqueeze(2).expand(sub, n_sub, r, nbpr))
        return spec.fit_chunk(xt, wt, ws, cfgs)

    return _gather_fields(map_chunks(one, range(0, rows, rows_per_chunk), x.device), rows * nbpr), None


def fit(
    w: torch.Tensor,
    ggml_type: int,
    importance: torch.Tensor | None = None,
    effort: str = "best",
    value_path: bool = False,
) -> BlockFields:
    """``fit_with_error`` without the statistics: the fields alone (see there for shapes and meaning)."""
    return _fit(w, ggml_type, importance, effort, value_path, want_error=False)[0]


# --------------------------------------------------------------------------------------------------------------------
# Fixed scales, new codes (GPTQ) and column-block bookkeeping
# --------------------------------------------------------------------------------------------------------------------


def _rows_cols(fields: BlockFields, rows: int) -> tuple[GGMLType, int]:
    """Validate that the fields describe ``rows`` whole rows; returns (type, n)."""
    t, _ = _spec(fields.ggml_type)
    total = fields.n_blocks * BLOCK_SIZE[t]
    if rows <= 0 or total % rows or (total // rows) % BLOCK_SIZE[t]:
        raise ValueError(f"{t.name}: {fields.n_blocks} blocks do not form {rows} rows of whole blocks")
    return t, total // rows


@dataclass(frozen=True)
class ElementGrid:
    """Per-element decoding of a column slice of a GGML tensor: value = scale · level(code) + offset.

    scale, offset: float32 [rows, k] (offset None for types without a min), formed with the dequantizer's own float32
    arithmetic (d·sc for K-quants, d·(sc − 32) for IQ4_XS, −dmin·m as the K-quant offset). A code c stands for level
    c − zero (uniform grids, codes code_lo..code_hi) or codebook[c] (IQ4). Codes are stored as ``q_dtype``.
    """

    scale: torch.Tensor
    offset: torch.Tensor | None
    code_lo: int
    code_hi: int
    zero: int
    codebook: tuple[int, ...] | None
    q_dtype: torch.dtype

    @property
    def levels(self) -> _Levels:
        return _Levels(self.code_lo, self.code_hi, self.zero, self.codebook)


def element_grid(fields: BlockFields, rows: int, col_start: int = 0, col_end: int | None = None) -> ElementGrid:
    """Scales and offsets of the elements in columns [col_start, col_end) of the [rows, n] tensor the fields describe.

    n is implied (n = n_blocks · BLOCK_SIZE / rows). The range may start or end inside a block; only the blocks it
    touches are read, so per-column calls cost O(rows · BLOCK_SIZE).
    """
    t, n = _rows_cols(fields, rows)
    _, spec = _spec(t)
    col_end = n if col_end is None else col_end
    if not 0 <= col_start <= col_end <= n:
        raise ValueError(f"column range [{col_start}, {col_end}) is outside [0, {n})")
    bs = BLOCK_SIZE[t]
    b0, b1 = col_start // bs, max(col_start // bs, -(-col_end // bs))
    f = slice_columns(fields, rows, b0 * bs, b1 * bs)
    nb = f.n_blocks
    f32 = lambda h: h.to(torch.float32)  # noqa: E731 - exact widening of fp16 / integer fields
    off = None
    if t in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.IQ4_NL, GGMLType.Q4_1, GGMLType.Q5_1):
        a = f32(f.d)[:, None].expand(nb, bs)
        if t in (GGMLType.Q4_1, GGMLType.Q5_1):
            off = f32(f.m)[:, None].expand(nb, bs)
    else:
        sc = f32(f.sc) - 32 if t == GGMLType.IQ4_XS else f32(f.sc)
        rep = bs // f.sc.shape[1]
        a = (f32(f.d)[:, None] * sc).repeat_interleave(rep, dim=1)
        if t in (GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.Q5_K):
            off = -(f32(f.dmin)[:, None] * f32(f.m)).repeat_interleave(rep, dim=1)
    c0, c1 = col_start - b0 * bs, col_end - b0 * bs
    a = a.reshape(rows, (b1 - b0) * bs)[:, c0:c1]
    off = None if off is None else off.reshape(rows, (b1 - b0) * bs)[:, c0:c1]
    lv = spec.levels
    return ElementGrid(a, off, lv.code_lo, lv.code_hi, lv.zero, lv.codebook, spec.q_dtype)


@torch.no_grad()
def nearest_codes(w_cols: torch.Tensor, fields: BlockFields, col_start: int = 0) -> torch.Tensor:
    """Nearest codes for new weights of columns [col_start, col_start + k), keeping the fields' scales and mins.

    w_cols: float [rows, k], the new values of those columns of the [rows, n] tensor that ``fields`` describe (n is
    implied by the fields and rows). Returns codes [rows, k] in the fields' ``q`` dtype (uint8; int8 for Q8_0) in
    natural element order, each the code whose dequantized value is nearest to the weight (ties as in llama.cpp:
    to even on uniform grids, upwards on the IQ4 codebook).
    Any column range works, including one that starts or ends inside a block, so a GPTQ loop can fix a block's scales
    (``fit`` on its columns) and then quantize its columns one at a time, feeding the error forward::

        parts = []
        for c0 in range(0, n, 256):                            # one column block (a multiple of BLOCK_SIZE)
            f = fit(W[:, c0:c0 + 256], T, imp[c0:c0 + 256])    # scales from the error-updated weights
            q = torch.empty(rows, 256, dtype=f.q.dtype)
            for j in range(256):
                q[:, j:j + 1] = nearest_codes(W[:, c0 + j:c0 + j + 1], f, j)
                err = W[:, c0 + j] - column_values(q[:, j:j + 1], f, j)[:, 0]
                ...                                            # spread err over the columns not yet quantized
            parts.append(replace_codes(f, q))
        fields = hstack(parts, rows)                           # the [rows, n] tensor's fields
    """
    g = element_grid(fields, w_cols.shape[0], col_start, col_start + w_cols.shape[1])
    return grid_codes(w_cols, g, slice(None))


def grid_codes(w_cols: torch.Tensor, g: ElementGrid, cols: slice) -> torch.Tensor:
    """Nearest codes of float [rows, k] for the columns ``cols`` of an element grid (see ``nearest_codes``): lets a
    GPTQ loop take a block's grid once and quantize its columns one at a time without re-deriving it."""
    x = w_cols.detach().to(device=g.scale.device, dtype=torch.float32)
    if g.offset is not None:
        x = x - g.offset[:, cols]
    return _codes_of(x * _safe_inv(g.scale[:, cols]), g.levels, g.q_dtype)


def grid_values(codes: torch.Tensor, g: ElementGrid, cols: slice) -> torch.Tensor:
    """Dequantized float32 [rows, k] of codes at the columns ``cols`` of an element grid (see ``column_values``)."""
    v = g.scale[:, cols] * _code_values(codes.to(g.scale.device), g.levels)
    return v if g.offset is None else v + g.offset[:, cols]


def column_values(codes: torch.Tensor, fields: BlockFields, col_start: int = 0) -> torch.Tensor:
    """Dequantized values float32 [rows, k] of codes [rows, k] placed at columns [col_start, col_start + k).

    Bit-exact with ``dequantize``: the same float32 operations in the same order ((scale · level) + offset).
    """
    g = element_grid(fields, codes.shape[0], col_start, col_start + codes.shape[1])
    return grid_values(codes, g, slice(None))


def replace_codes(fields: BlockFields, codes: torch.Tensor) -> BlockFields:
    """The same fields with new codes. codes: [n_blocks, BLOCK_SIZE] or [rows, n] (row-major), any integer dtype."""
    t, spec = _spec(fields.ggml_type)
    q = codes.reshape(fields.n_blocks, BLOCK_SIZE[t]).to(device=fields.q.device, dtype=spec.q_dtype)
    return dataclasses.replace(fields, q=q)


@torch.no_grad()
def requantize(w: torch.Tensor, fields: BlockFields) -> BlockFields:
    """Keep the fields' scales and mins, choose the nearest codes for new weights w: float [rows, n]."""
    t, _ = _spec(fields.ggml_type)
    rows, n = _check_w(w, t)
    if rows * n != fields.n_blocks * BLOCK_SIZE[t]:
        raise ValueError(f"{t.name}: w has {rows * n} elements, the fields {fields.n_blocks * BLOCK_SIZE[t]}")
    return replace_codes(fields, nearest_codes(w, fields, 0))


def slice_columns(fields: BlockFields, rows: int, col_start: int, col_end: int) -> BlockFields:
    """Fields of columns [col_start, col_end) (block-aligned) of the [rows, n] tensor the fields describe."""
    t, n = _rows_cols(fields, rows)
    bs = BLOCK_SIZE[t]
    if col_start % bs or col_end % bs or not 0 <= col_start <= col_end <= n:
        raise ValueError(f"{t.name}: column range [{col_start}, {col_end}) is not block-aligned within [0, {n})")
    nbpr = n // bs
    out = {}
    for f in dataclasses.fields(fields):
        v = getattr(fields, f.name)
        out[f.name] = v.reshape(rows, nbpr, *v.shape[1:])[:, col_start // bs : col_end // bs].reshape(-1, *v.shape[1:])
    return type(fields)(**out)


def hstack(parts: list[BlockFields], rows: int) -> BlockFields:
    """Fields of [rows, n_i] column blocks (left to right, same type) -> fields of the [rows, Σ n_i] tensor."""
    if not parts:
        raise ValueError("hstack needs at least one part")
    for p in parts:
        _rows_cols(p, rows)
    cls = type(parts[0])
    if any(type(p) is not cls for p in parts):
        raise ValueError("hstack: parts of different types")
    out = {}
    for f in dataclasses.fields(cls):
        vs = [getattr(p, f.name) for p in parts]
        out[f.name] = torch.cat([v.reshape(rows, -1, *v.shape[1:]) for v in vs], dim=1).reshape(-1, *vs[0].shape[1:])
    return cls(**out)


def dequantize(fields: BlockFields, n: int) -> torch.Tensor:
    """Fields of a [rows, n] tensor -> float32 [rows, n] (bit-exact ggml dequantization via ``ggml_blocks``)."""
    _spec(fields.ggml_type)
    return dequantize_blocks(fields).reshape(-1, n)


def weighted_error(w: torch.Tensor, fields: BlockFields, importance: torch.Tensor | None = None) -> float:
    """Σ importance[col]·(w − dequant)², or Σ (w − dequant)² without importance, accumulated in float64."""
    e = (w.to(torch.float64) - dequantize(fields, w.shape[1]).to(device=w.device, dtype=torch.float64)).square_()
    if importance is not None:
        e = e * importance.to(device=e.device, dtype=torch.float64)
    return float(e.sum())

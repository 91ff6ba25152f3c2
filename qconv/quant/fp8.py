"""FP8 E4M3 (float8_e4m3fn) weight quantization, as pure functions: choose scales → quantize → dequantize.

A weight [out, in] is divided by a float32 scale — one per tensor, per output channel, or per bh × bw block —
clamped to ±448 (E4M3's largest finite value: saturation is explicit, since a cast of a larger value is not) and
rounded to the nearest E4M3 value (ties to even, torch's cast). Loaders compute fp8 · scale in float32.

Scales are amax-based: scale = amax / 448, so the largest |w| of each group maps to ±448 exactly; an all-zero
group gets scale 1. With ``search`` the scale of each group is the one among amax·r/448, r ∈ SEARCH_RATIOS, that
minimises the group's squared error after rounding (clipping a few outliers can buy finer steps for the rest).

Activation scales (static): input_scale = max |x| over calibration / 448, float32 [1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qconv.errors import InputError
from qconv.kernels.fp8 import expand_scale

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8_DTYPE = torch.float8_e4m3fn
SCALE_KINDS = ("tensor", "channel", "block")
ACTIVATIONS = ("static", "dynamic", "none")
SEARCH_RATIOS = tuple(1.0 - 0.02 * k for k in range(26))  # 1.00, 0.98, … 0.50 of the amax


@dataclass(frozen=True)
class Fp8Grid:
    """kind: "tensor" | "channel" | "block"; block: the block edge for "block" (bh = bw); search: MSE scale
    search; activations: "static" (calibrated input_scale), "dynamic" (loaders scale per token) or "none"
    (weight-only); dtype: the model dtype loaders round the dequantized weights to."""

    kind: str = "channel"
    block: int = 128
    search: bool = False
    activations: str = "dynamic"
    dtype: torch.dtype = torch.bfloat16

    @property
    def scheme(self) -> str:
        return "fp8"

    @property
    def block_size(self) -> tuple[int, int] | None:
        return (self.block, self.block) if self.kind == "block" else None

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def name(self) -> str:
        kind = f"block{self.block}" if self.kind == "block" else self.kind
        return f"fp8-e4m3-{kind}{'-mse' if self.search else ''}-a{self.activations}"

    def scale_shape(self, shape: tuple[int, int]) -> tuple[int, ...]:
        out_f, in_f = shape
        if self.kind == "tensor":
            return (1,)
        if self.kind == "channel":
            return (out_f, 1)
        return (-(-out_f // self.block), -(-in_f // self.block))


@dataclass(frozen=True)
class Fp8Tensor:
    """One weight [out, in] in FP8: ``weight`` float8_e4m3fn [out, in], ``scale`` float32 (grid.scale_shape),
    ``input_scale`` float32 [1] for static activations (else None)."""

    grid: Fp8Grid
    weight: torch.Tensor
    scale: torch.Tensor
    input_scale: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """fp8 · scale in float32, rounded once to ``dtype`` (default: the model dtype loaders load into)."""
        return dequantize(self.weight, self.scale, self.grid.block_size).to(dtype or self.grid.dtype)


def check_finite(w: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        raise InputError(f"{name}: weight holds {bad} NaN/Inf values; FP8 cannot represent them")


def group_amax(w: torch.Tensor, kind: str, block: int) -> torch.Tensor:
    """float32 max |w| per scale group, shaped like the scale (Fp8Grid.scale_shape)."""
    a = w.float().abs()
    if kind == "tensor":
        return a.amax().reshape(1)
    if kind == "channel":
        return a.amax(dim=1, keepdim=True)
    out_f, in_f = a.shape
    pr, pc = -out_f % block, -in_f % block
    a = torch.nn.functional.pad(a, (0, pc, 0, pr))  # zeros change no maximum
    return a.reshape(a.shape[0] // block, block, a.shape[1] // block, block).amax(dim=(1, 3))


def quantize(w: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None) -> torch.Tensor:
    """float8_e4m3fn [out, in]: w / scale in float32, clamped to ±448, rounded to nearest (ties to even)."""
    s = expand_scale(scale, tuple(w.shape), block_size)
    return (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None) -> torch.Tensor:
    """float32 [out, in]: fp8 · scale."""
    return q.float() * expand_scale(scale, tuple(q.shape), block_size)


def _group_sq_err(err: torch.Tensor, kind: str, block: int) -> torch.Tensor:
    """Sum of a squared-error map [out, in] per scale group, shaped like the scale."""
    if kind == "tensor":
        return err.sum().reshape(1)
    if kind == "channel":
        return err.sum(dim=1, keepdim=True)
    out_f, in_f = err.shape
    e = torch.nn.functional.pad(err, (0, -in_f % block, 0, -out_f % block))
    return e.reshape(e.shape[0] // block, block, e.shape[1] // block, block).sum(dim=(1, 3))


def choose_scales(w: torch.Tensor, grid: Fp8Grid) -> torch.Tensor:
    """float32 scales (grid.scale_shape): amax/448, or with grid.search the ratio of SEARCH_RATIOS with the least
    squared error per group (the first, i.e. the largest ratio, on ties)."""
    amax = group_amax(w, grid.kind, grid.block)
    base = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if not grid.search:
        return base
    wf = w.float()
    best, best_err = base, None
    for r in SEARCH_RATIOS:
        cand = torch.where(amax > 0, amax * r / FP8_MAX, torch.ones_like(amax))
        err = _group_sq_err((dequantize(quantize(wf, cand, grid.block_size), cand, grid.block_size) - wf) ** 2,
                            grid.kind, grid.block)  # fmt: skip
        if best_err is None:
            best, best_err = cand, err
        else:
            better = err < best_err
            best = torch.where(better, cand, best)
            best_err = torch.where(better, err, best_err)
    return best


def quantize_weight(w: torch.Tensor, grid: Fp8Grid, name: str = "weight") -> Fp8Tensor:
    """Quantize one weight [out, in] onto ``grid`` (NaN/Inf → InputError naming ``name``)."""
    check_finite(w, name)
    scale = choose_scales(w, grid)
    return with_stats(Fp8Tensor(grid, quantize(w, scale, grid.block_size), scale), w)


def with_stats(qt: Fp8Tensor, w: torch.Tensor) -> Fp8Tensor:
    """``qt`` with its error figures against the original weight w [out, in] (relative MSE, max |error|, values
    saturated at ±448) in ``stats``, for the manifest."""
    q, scale, grid = qt.weight, qt.scale, qt.grid
    wf = w.float()
    diff = dequantize(q, scale, grid.block_size) - wf
    qt.stats["rel_mse"] = float(diff.square().sum() / wf.square().sum().clamp_min(1e-30))
    qt.stats["max_abs_err"] = float(diff.abs().max()) if diff.numel() else 0.0
    # values clipped by the ±448 saturation, beyond 448's own rounding interval (only searched scales clip any)
    scaled = wf / expand_scale(scale, qt.shape, grid.block_size)
    qt.stats["saturated"] = float((scaled.abs() >= FP8_MAX + 16).sum())
    return qt


def input_scale(abs_max: torch.Tensor) -> torch.Tensor:
    """float32 [1] static activation scale from the per-column max |x| [in] collected over calibration."""
    m = abs_max.float().amax()
    return torch.where(m > 0, m / FP8_MAX, torch.ones_like(m)).reshape(1)

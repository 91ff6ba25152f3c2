"""The value passed from methods to formats: codes on a named grid, with the parameters that decode them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class IntGrid:
    """An integer grid with per-group scale and zero point: w ≈ (code − zero) · scale.

    bits: 1–8. group_size: input columns per group; −1 means one group per output row (per-channel).
    symmetric: the zero point is fixed at 2^(bits−1) (codes read as signed values).
    scale_dtype: the dtype the format stores scales in; methods choose scales already rounded to it, so the
    stored artifact dequantizes to exactly what the method measured.
    partial_groups: whether the format can store a last group shorter than group_size.
    """

    bits: int
    group_size: int
    symmetric: bool
    scale_dtype: torch.dtype = torch.float32
    partial_groups: bool = True
    act_order: bool = False  # groups follow a processing order: the tensor carries a g_idx [in]

    @property
    def name(self) -> str:
        g = "c" if self.group_size == -1 else str(self.group_size)
        return f"int{self.bits}-g{g}-{'sym' if self.symmetric else 'asym'}"

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        return 1 << (self.bits - 1)

    def n_groups(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        return -(-in_features // g)

    def effective_group(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


@dataclass(frozen=True)
class QuantizedTensor:
    """One linear weight [out, in] after quantization.

    codes:  uint8 [out, in], grid indices 0 … 2^bits−1, in the weight's own (un-permuted) column order.
    scales: float [out, n_groups] in ``grid.scale_dtype``.
    zeros:  float32 [out, n_groups] zero points in code units (integers for IntGrid; 2^(bits−1) when symmetric).
    g_idx:  int32 [in] group of each input column, or None for the contiguous layout (column i → i // group).
    stats:  error figures the method measured (rel_mse, max_abs_err, …), recorded in the manifest.
    """

    grid: IntGrid
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def group_index(self) -> torch.Tensor:
        """int64 [in]: the group of each input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        g = self.grid.effective_group(self.shape[1])
        return torch.arange(self.shape[1], device=self.codes.device) // g

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weights a loader computes: (code − zero)·scale rounded once to ``dtype``, by default the scales'
        own dtype (compressed-tensors and vLLM dequantize in it). Pass float32 for the exact products."""
        from qconv.quant.int_grid import dequantize

        return dequantize(self.codes, self.scales, self.zeros, self.group_index(), dtype or self.grid.scale_dtype)


@dataclass(frozen=True)
class GGMLGrid:
    """A llama.cpp block type (Q4_K, Q8_0, IQ4_XS, …) as a quantization target; the type fixes everything."""

    ggml_type: int
    # search effort of qconv.quant.ggml_grid.fit: "best", "fast", or "auto" (best with importance weights, else fast)
    effort: str = "best"

    @property
    def name(self) -> str:
        from qconv.formats.ggml_blocks import GGMLType

        return GGMLType(self.ggml_type).name

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32  # ggml dequantizes in float32


@dataclass(frozen=True)
class BlockQuantizedTensor:
    """One weight [out, in] on a GGML block grid: ``fields`` (qconv.formats.ggml_blocks) hold every stored
    component, blocks in row-major order (row r's blocks are r·in/B … (r+1)·in/B − 1)."""

    grid: GGMLGrid
    fields: object
    shape: tuple[int, int]
    stats: dict[str, float] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from qconv.quant.ggml_grid import dequantize

        return dequantize(self.fields, self.shape[1]).reshape(self.shape).to(dtype or torch.float32)


def error_stats(deq: torch.Tensor, w: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, float]:
    """Reconstruction error of the float32 dequantization ``deq`` [out, in] (consumed: overwritten) against the weight
    ``w``: relative squared error, max |error| and, with ``importance`` [in], the importance-weighted relative squared
    error. One pass per figure and no temporaries beyond ``deq`` itself (these run on every tensor of a model)."""
    wf = w.float()
    sums = ErrorSums(importance, w.device)
    sums.add(deq.reshape(wf.shape).sub_(wf), wf)
    return sums.stats()


# Tensors above this many elements get their statistics in row chunks: no float32 copy of a whole embedding or output
# matrix is ever made (peak memory stays near one decoder layer), and on a CPU the chunk's temporaries (2 MB) stay in
# cache.
STATS_CHUNK = 1 << 19


def with_block_error_stats(
    qt: BlockQuantizedTensor, w: torch.Tensor, importance: torch.Tensor | None = None
) -> BlockQuantizedTensor:
    """Attach ``error_stats`` of ``qt``'s dequantization against the float weight ``w`` [out, in]."""
    rows, n = qt.shape
    if rows * n <= STATS_CHUNK:
        qt.stats.update(error_stats(qt.dequantize(), w, importance))
        return qt
    from qconv.formats.ggml_blocks import slice_blocks
    from qconv.quant.ggml_grid import dequantize

    nbpr = qt.fields.n_blocks // rows
    step = max(1, STATS_CHUNK // n)
    sums = ErrorSums(importance, w.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        wf = w[r0:r1].float()
        deq = dequantize(slice_blocks(qt.fields, r0 * nbpr, r1 * nbpr), n).to(w.device)
        sums.add(deq.view(r1 - r0, n).sub_(wf), wf)
    qt.stats.update(sums.stats())
    return qt


class ErrorSums:
    """``error_stats`` accumulated over row chunks of a tensor: Σ diff², Σ w², the extremes of diff and, with an
    importance vector [in], Σ imp·diff² and Σ imp·w²."""

    def __init__(self, importance: torch.Tensor | None, device: torch.device | str = "cpu") -> None:
        self.imp = None if importance is None else importance.float().to(device).reshape(-1)
        self.dd = self.ww = self.num = self.den = 0.0
        self.lo = self.hi = 0.0

    def add(self, diff: torch.Tensor, w: torch.Tensor) -> None:
        """diff = dequantized − w (float32 [rows, in], consumed) for the float32 weights w [rows, in]."""
        d1, w1 = diff.reshape(-1), w.reshape(-1)
        self.dd += float(d1.dot(d1))
        self.ww += float(w1.dot(w1))
        if d1.numel():
            lo, hi = torch.aminmax(d1)
            self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        if self.imp is not None:
            self.num += float(diff.square_().mv(self.imp).sum())
            self.den += float(w.square().mv(self.imp).sum())  # not in place: w may be the caller's own weights

    def empty(self) -> ErrorSums:
        """A zeroed accumulator of the same kind, for one chunk of work running beside others (``merge`` them back
        in chunk order and the sums are the same as one accumulator's, bit for bit)."""
        e = ErrorSums(None)
        e.imp = self.imp
        return e

    def merge(self, other: ErrorSums) -> None:
        self.dd += other.dd
        self.ww += other.ww
        self.num += other.num
        self.den += other.den
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def stats(self) -> dict[str, float]:
        out = {"rel_mse": self.dd / max(self.ww, 1e-30), "max_abs_err": max(-self.lo, self.hi)}
        if self.imp is not None:
            out["rel_mse_weighted"] = self.num / max(self.den, 1e-30)
        return out


Grid = IntGrid | GGMLGrid
Quantized = QuantizedTensor | BlockQuantizedTensor

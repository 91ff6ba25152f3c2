"""Integer grids with per-group scale and zero point, as pure functions: choose qparams → quantize → dequantize.

Shapes: weights ``w`` are float [out, in]; ``gidx`` is int64 [in] (group of each input column); per-group
parameters are [out, n_groups]. Codes are unsigned, 0 … 2^bits−1; a symmetric grid fixes the zero at 2^(bits−1).
"""

from __future__ import annotations

import torch

from qconv.quant.tensor import IntGrid, QuantizedTensor


def contiguous_gidx(in_features: int, grid: IntGrid, device: torch.device | str = "cpu") -> torch.Tensor:
    """int64 [in]: column i belongs to group i // group_size (the last group may be partial)."""
    return torch.arange(in_features, device=device) // grid.effective_group(in_features)


def group_reduce(x: torch.Tensor, gidx: torch.Tensor, n_groups: int, op: str) -> torch.Tensor:
    """Reduce float [out, in] over the columns of each group → [out, n_groups]. op: amin | amax | sum."""
    in_f = x.shape[1]
    if op != "sum" and n_groups and in_f % n_groups == 0:
        # Contiguous equal groups (the common layout): a reshape and one reduction, several times faster than a
        # scatter, and exactly the same extrema (sums keep the scatter: its order fixes their rounding).
        gs = in_f // n_groups
        if torch.equal(gidx, torch.arange(in_f, device=gidx.device) // gs):
            r = x.reshape(x.shape[0], n_groups, gs)
            return r.amin(-1) if op == "amin" else r.amax(-1)
    out = torch.zeros(x.shape[0], n_groups, dtype=x.dtype, device=x.device)
    index = gidx.unsqueeze(0).expand_as(x)
    if op == "sum":
        return out.scatter_add_(1, index, x)
    return out.scatter_reduce_(1, index, x, op, include_self=False)


def choose_qparams(lo: torch.Tensor, hi: torch.Tensor, grid: IntGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for groups spanning [lo, hi] (float [out, G]) → (scale in grid.scale_dtype, zero float32).

    Symmetric: the endpoint of larger magnitude maps to code 0 (value −2^(bits−1)), so the full code range is
    used whatever that endpoint's sign (the scale is negative when it is positive), as llama.cpp's Q4_0 does.
    Asymmetric: the range is widened to contain 0 (so an all-zero group is exact), the zero point is
    an integer code. A constant group (lo == hi) is exact on both grids: its step is the constant's magnitude and
    its value sits one code from the zero point. Scales are rounded to the storage dtype *before* codes are chosen.
    """
    const = lo == hi
    # A scale that underflowed in a low-precision dtype would make codes explode; keep it representable.
    tiny = torch.finfo(grid.scale_dtype).tiny if grid.scale_dtype.is_floating_point else 0
    if grid.symmetric:
        big = torch.where(hi.abs() >= lo.abs(), hi, lo)
        scale = torch.where(const, -big, big / -grid.mid)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        scale = scale.to(grid.scale_dtype)
        scale = torch.where(scale == 0, torch.full_like(scale, tiny), scale)
        zero = torch.full_like(lo, float(grid.mid), dtype=torch.float32)
        return scale, zero
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.where(const, hi - lo, (hi - lo) / grid.qmax)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = scale.to(grid.scale_dtype)
    scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)
    zero = torch.clamp(torch.round(-lo / scale.float()), 0, grid.qmax).to(torch.float32)
    return scale, zero


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, gidx: torch.Tensor, grid: IntGrid
) -> torch.Tensor:
    """Round float [out, in] onto the grid → uint8 codes [out, in]."""
    s = scale.float()[:, gidx]
    z = zero[:, gidx]
    return torch.clamp(torch.round(w.float() / s) + z, 0, grid.qmax).to(torch.uint8)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    gidx: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(code − zero) · scale, computed in float32 and rounded once to ``dtype``.

    That single rounding equals what a loader computing in the scale's own dtype gets, since (code − zero) is a
    small integer, exact in every float dtype used for scales.
    """
    return ((codes.float() - zero.float()[:, gidx]) * scale.float()[:, gidx]).to(dtype)


def _group_error(
    w: torch.Tensor, deq: torch.Tensor, gidx: torch.Tensor, n_groups: int, importance: torch.Tensor | None
) -> torch.Tensor:
    err = (deq - w).square()
    if importance is not None:
        err = err * importance.unsqueeze(0)
    return group_reduce(err, gidx, n_groups, "sum")


# Rows are independent on an integer grid: working in row blocks bounds the temporaries (several float copies
# of the block) to a few MB whatever the matrix size, which keeps the pipeline near "one layer" of memory.
ROW_BLOCK = 1024


def quantize_weight(
    w: torch.Tensor,
    grid: IntGrid,
    gidx: torch.Tensor | None = None,
    clip: str = "minmax",
    importance: torch.Tensor | None = None,
    clip_steps: int = 24,
    max_shrink: float = 0.3,
) -> QuantizedTensor:
    """Round-to-nearest quantization of one weight [out, in] (any float dtype) onto ``grid``.

    clip: "minmax" uses each group's full range; "mse" searches, per group, a shrink factor of the range in
    [1 − max_shrink, 1] minimising the squared error, weighted per input column by ``importance`` (float [in],
    e.g. mean x² from calibration) when given.
    gidx: int64 [in] group per column (act-order layouts); None means contiguous groups.
    """
    if clip not in ("minmax", "mse"):
        raise ValueError(f"unknown clip mode {clip!r}")
    out_f, in_f = w.shape
    explicit_gidx = gidx is not None
    if gidx is None:
        gidx = contiguous_gidx(in_f, grid, w.device)
    n_groups = int(gidx.max().item()) + 1 if in_f else 0
    imp = None if importance is None else importance.float().clamp_min(0).to(w.device)
    parts = [
        _quantize_rows(w[r : r + ROW_BLOCK].float(), grid, gidx, n_groups, clip, imp, clip_steps, max_shrink)
        for r in range(0, out_f, ROW_BLOCK)
    ]
    qt = QuantizedTensor(
        grid=grid,
        codes=torch.cat([p[0] for p in parts]),
        scales=torch.cat([p[1] for p in parts]),
        zeros=torch.cat([p[2] for p in parts]),
        g_idx=gidx.to(torch.int32) if explicit_gidx else None,
    )
    return with_error_stats(qt, w, importance)


def _quantize_rows(w, grid, gidx, n_groups, clip, imp, clip_steps, max_shrink):
    lo = group_reduce(w, gidx, n_groups, "amin")
    hi = group_reduce(w, gidx, n_groups, "amax")
    scale, zero = choose_qparams(lo, hi, grid)
    codes = quantize(w, scale, zero, gidx, grid)
    if clip == "mse":
        best = _group_error(w, dequantize(codes, scale, zero, gidx), gidx, n_groups, imp)
        for k in range(1, clip_steps + 1):
            p = 1.0 - max_shrink * k / clip_steps
            s2, z2 = choose_qparams(lo * p, hi * p, grid)
            c2 = quantize(w, s2, z2, gidx, grid)
            e2 = _group_error(w, dequantize(c2, s2, z2, gidx), gidx, n_groups, imp)
            better = e2 < best
            if better.any():
                best = torch.where(better, e2, best)
                scale = torch.where(better, s2, scale)
                zero = torch.where(better, z2, zero)
                codes = torch.where(better[:, gidx], c2, codes)
    return codes, scale, zero


def with_error_stats(qt: QuantizedTensor, w: torch.Tensor, importance: torch.Tensor | None = None) -> QuantizedTensor:
    """Attach the reconstruction error of ``qt`` (as loaders dequantize it) against the float weight ``w``: relative
    squared error, max |error| and, with ``importance`` [in], the importance-weighted relative squared error."""
    imp = None if importance is None else importance.float().to(w.device).unsqueeze(0)
    gidx = qt.group_index()
    err = ref = werr = wref = 0.0
    max_abs = 0.0
    for r in range(0, w.shape[0], ROW_BLOCK):
        rows = slice(r, r + ROW_BLOCK)
        wf = w[rows].float()
        deq = dequantize(qt.codes[rows], qt.scales[rows], qt.zeros[rows], gidx, qt.grid.scale_dtype).float()
        d2 = (deq - wf).square()
        err += float(d2.sum())
        ref += float(wf.square().sum())
        max_abs = max(max_abs, float(d2.max().sqrt())) if d2.numel() else max_abs
        if imp is not None:
            werr += float((d2 * imp).sum())
            wref += float((wf.square() * imp).sum())
    stats = {"rel_mse": err / max(ref, 1e-30), "max_abs_err": max_abs}
    if imp is not None:
        stats["rel_mse_weighted"] = werr / max(wref, 1e-30)
    qt.stats.update(stats)
    return qt

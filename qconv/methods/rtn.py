"""Round-to-nearest: each group's (or block's) parameters from its own weights, no error feedback."""

from __future__ import annotations

import torch

from qconv.methods.base import LayerContext, Method, rtn_fallback
from qconv.model.arch import VALUE_PATH
from qconv.quant import ggml_grid
from qconv.quant.int_grid import quantize_weight
from qconv.quant.tensor import BlockQuantizedTensor, GGMLGrid, Grid, IntGrid, Quantized, with_block_error_stats


def rtn(
    w: torch.Tensor,
    grid: Grid,
    clip: str = "minmax",
    importance: torch.Tensor | None = None,
    value_path: bool = False,
) -> Quantized:
    """Quantize one weight [out, in] onto ``grid`` by rounding to nearest.

    Integer grids: scale/zero from each group's range, or with ``clip="mse"`` a searched clipping range.
    GGML grids: llama.cpp's formats with a least-squares search of every (sub-)block's scale and min
    (qconv.quant.ggml_grid.fit). ``importance`` (float [in], e.g. calibration mean x² or an imatrix) weights the
    squared error per input column in both. ``value_path``: w is an attention v or o projection (GGML grids weigh
    its elements differently, see ggml_grid.fit).
    """
    if isinstance(grid, IntGrid):
        return quantize_weight(w, grid, clip=clip, importance=importance)
    if isinstance(grid, GGMLGrid):
        fields, stats = ggml_grid.fit_with_error(w, grid.ggml_type, importance, grid.effort, value_path)
        qt = BlockQuantizedTensor(grid, fields, tuple(w.shape))
        if stats is not None:  # formed by the fit itself
            qt.stats.update(stats)
            return qt
        return with_block_error_stats(qt, w, importance)
    raise TypeError(f"RTN cannot quantize onto {grid!r}")


class RTN(Method):
    """RTN onto integer or GGML grids. Importance per input column comes from an imatrix (``--imatrix FILE``), or
    from calibration (``--imatrix auto``, or ``--clip mse`` on integer grids: the same mean x² llama.cpp's imatrix
    holds, collected on the outputs of the already quantized layers); plain RTN needs no calibration at all."""

    name = "rtn"
    description = "round-to-nearest; searched clipping (int) / least-squares block scales (GGUF); optional imatrix"

    @property
    def needs_calibration(self) -> bool:
        imp = self.options.extra.get("importance", "none")
        if self.options.extra.get("no_calib", False) or isinstance(imp, dict):
            return False
        return imp == "auto" or self.options.clip == "mse"

    def importance(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
        imp = self.options.extra.get("importance", "none")
        if isinstance(imp, dict):
            prefix = ctx.prefix
            return {n: imp[prefix + n] for n in ctx.linears if prefix + n in imp}
        if self.needs_calibration and ctx.collect is not None:
            stats = ctx.collect({name: {"sq_mean"} for name in ctx.linears})
            # a linear no token reached (an unrouted expert) has no importance: plain RTN, marked as fallback
            self.starved = {n for n, s in stats.items() if s.count == 0}
            return {n: s.sq_mean for n, s in stats.items() if s.count > 0}
        return {}

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Quantized]:
        self.starved: set[str] = set()
        imp = self.importance(ctx)
        out = {n: rtn(ctx.weight(n), ctx.grids[n], self.options.clip, imp.get(n), n in VALUE_PATH) for n in ctx.linears}
        for n in self.starved:
            rtn_fallback(out[n])
        return out

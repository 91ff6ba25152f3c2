"""Round-to-nearest: each group's scale/zero from its range, optionally with a searched clipping range."""

from __future__ import annotations

from qconv.methods.base import LayerContext, Method
from qconv.quant.int_grid import quantize_weight
from qconv.quant.tensor import QuantizedTensor


class RTN(Method):
    """RTN onto integer grids. ``--clip mse`` searches each group's clipping range for least squared error,
    weighted per input column by the calibration mean x² when calibration data is present (the same importance
    llama.cpp's imatrix uses); plain RTN needs no calibration at all."""

    name = "rtn"
    description = "round-to-nearest, optional per-group MSE clip search (activation-weighted with calibration)"

    @property
    def needs_calibration(self) -> bool:
        return self.options.clip == "mse" and not self.options.extra.get("no_calib", False)

    def quantize_layer(self, ctx: LayerContext) -> dict[str, QuantizedTensor]:
        stats = {}
        if self.needs_calibration and ctx.collect is not None:
            stats = ctx.collect({name: {"sq_mean"} for name in ctx.linears})
        out = {}
        for name in ctx.linears:
            imp = stats[name].sq_mean if name in stats else None
            out[name] = quantize_weight(ctx.weight(name), ctx.grids[name], clip=self.options.clip, importance=imp)
        return out

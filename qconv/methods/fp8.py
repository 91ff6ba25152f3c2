"""FP8 E4M3 as a method: amax (or MSE-searched) weight scales per tensor, channel or block; activation scales
static from calibration, dynamic (computed by loaders per token), or none (weight-only)."""

from __future__ import annotations

import dataclasses

from qconv.errors import InputError
from qconv.methods.base import LayerContext, Method
from qconv.options import Option
from qconv.quant.fp8 import ACTIVATIONS, Fp8Grid, input_scale, quantize_weight


class FP8(Method):
    name = "fp8"
    description = "FP8 E4M3 weights (tensor/channel/128×128 block scales, optional MSE search); static/dynamic acts"
    scheme = "fp8"
    options = (
        Option("fp8_scale", str, "auto", "weight scale granularity (auto: the format's usual one — channel for "
               "safetensors, block for --format fp8)", choices=("auto", "tensor", "channel", "block")),
        Option("fp8_block", int, 128, "block edge for fp8_scale=block (bh = bw)"),
        Option("fp8_search", bool, False, "search each scale for least squared error instead of amax/448"),
        Option("activations", str, "dynamic", "activation scales: static (from calibration), dynamic (per token, "
               "at run time) or none (weight-only)", choices=ACTIVATIONS),
    )  # fmt: skip

    @property
    def needs_calibration(self) -> bool:
        x = self.options.extra
        return x.get("activations", "dynamic") == "static" and not x.get("no_calib", False)

    def quantize_layer(self, ctx: LayerContext):
        out = {}
        for n in ctx.linears:
            grid = ctx.grids[n]
            if not isinstance(grid, Fp8Grid):
                raise TypeError(f"fp8 cannot quantize onto {grid!r}")
            out[n] = quantize_weight(ctx.weight(n), grid, name=f"{ctx.prefix}{n}")
        static = [n for n in ctx.linears if ctx.grids[n].activations == "static"]
        if static:
            if ctx.collect is None:
                raise InputError("--opt activations=static needs calibration data (drop --no-calib)")
            # input ranges seen through the FP8 weights, as the deployed model will see them
            for n in static:
                ctx.set_weight(n, out[n].dequantize())
            stats = ctx.collect({n: {"abs_max"} for n in static})
            for n in static:
                out[n] = dataclasses.replace(out[n], input_scale=input_scale(stats[n].abs_max))
                out[n].stats["input_amax"] = float(stats[n].abs_max.amax())
        return out

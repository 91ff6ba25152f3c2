"""FP8 E4M3 as a method: amax (or MSE-searched) weight scales per tensor, channel or block, weights rounded to
nearest or (``fp8_gptq``) GPTQ error feedback onto the FP8 grid; activation scales static from calibration, dynamic
(computed by loaders per token), or none (weight-only)."""

from __future__ import annotations

import dataclasses

from qconv.errors import InputError
from qconv.methods.base import LayerContext, Method, rtn_fallback
from qconv.options import Option
from qconv.quant.fp8 import ACTIVATIONS, Fp8Grid, Fp8Tensor, check_finite, input_scale, quantize_weight
from qconv.quant.gptq import GPTQConfig, gptq_fp8


class FP8(Method):
    name = "fp8"
    description = "FP8 E4M3 weights (tensor/channel/128×128 block scales, optional MSE search); static/dynamic acts"
    scheme = "fp8"
    options = (
        Option("fp8_scale", str, "auto", "weight scale granularity (auto: the format's usual one — channel for "
               "safetensors, block for --format fp8)", choices=("auto", "tensor", "channel", "block")),
        Option("fp8_block", int, 128, "block edge for fp8_scale=block (bh = bw)"),
        Option("fp8_search", bool, False, "search each scale for least squared error instead of amax/448"),
        Option("fp8_gptq", bool, False, "GPTQ error feedback onto the FP8 grid (needs calibration; --damp, "
               "--act-order apply)"),
        Option("activations", str, "dynamic", "activation scales: static (from calibration), dynamic (per token, "
               "at run time) or none (weight-only)", choices=ACTIVATIONS),
    )  # fmt: skip

    def __init__(self, options):
        super().__init__(options)
        x = options.extra
        if not x.get("fp8_gptq", False) and (x.get("act_order") or x.get("damp", 0.01) != 0.01):
            raise InputError("--damp and --act-order apply to --method fp8 only with --opt fp8_gptq=true")

    @property
    def needs_calibration(self) -> bool:
        x = self.options.extra
        if x.get("no_calib", False):
            return False
        return x.get("activations", "dynamic") == "static" or bool(x.get("fp8_gptq", False))

    def quantize_layer(self, ctx: LayerContext):
        for n in ctx.linears:
            if not isinstance(ctx.grids[n], Fp8Grid):
                raise TypeError(f"fp8 cannot quantize onto {ctx.grids[n]!r}")
        out = (
            self._gptq(ctx)
            if self.options.extra.get("fp8_gptq", False)
            else {n: quantize_weight(ctx.weight(n), ctx.grids[n], name=f"{ctx.prefix}{n}") for n in ctx.linears}
        )
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

    def _gptq(self, ctx: LayerContext) -> dict[str, Fp8Tensor]:
        """True-sequential GPTQ (q/k/v, o, gate/up, down), each group's Hessian from inputs that already pass
        through the FP8 weights of the groups before it."""
        if ctx.collect is None:
            raise InputError("--opt fp8_gptq needs calibration data (drop --no-calib)")
        x = self.options.extra
        cfg = GPTQConfig(damp=float(x.get("damp", 0.01)), act_order=bool(x.get("act_order", False)))
        out: dict[str, Fp8Tensor] = {}
        for group in (g.linears for g in ctx.sequential_groups()):
            st = ctx.collect({group[0]: {"xtx"}}).pop(group[0])
            h = st.xtx.div_(st.count) if st.count else None
            for n in group:
                check_finite(ctx.weight(n), f"{ctx.prefix}{n}")
                if h is None:  # an expert never routed to: no Hessian, plain rounding
                    out[n] = rtn_fallback(quantize_weight(ctx.weight(n), ctx.grids[n], name=f"{ctx.prefix}{n}"))
                else:
                    try:
                        out[n] = gptq_fp8(ctx.weight(n), h, ctx.grids[n], cfg)[0]
                    except ValueError as e:
                        raise InputError(f"{ctx.prefix}{n}: {e}") from None
                ctx.set_weight(n, out[n].dequantize())
            del h, st
        return out

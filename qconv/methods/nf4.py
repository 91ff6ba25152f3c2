"""NF4 and FP4 (bitsandbytes' 4-bit blockwise schemes) as methods: calibration-free, each weight on its own."""

from __future__ import annotations

from qconv.methods.base import LayerContext, Method
from qconv.options import Option
from qconv.quant.nf4 import Bnb4Grid, quantize_weight

BNB4_OPTIONS = (
    Option(
        "blocksize",
        int,
        64,
        "values per absmax block (32–4096, a power of two)",
        choices=(32, 64, 128, 256, 512, 1024, 2048, 4096),
    ),  # fmt: skip
    Option("double_quant", bool, True, "store the absmax in 8 bits (dynamic map, blocks of 256, mean offset)"),
)


class NF4(Method):
    """bitsandbytes NF4: normal-float code table, blockwise absmax, optional double quantization."""

    name = "nf4"
    description = "bitsandbytes NF4 (normal-float 4-bit, blockwise absmax, double quantization); --format bnb"
    scheme = "nf4"
    options = BNB4_OPTIONS

    def quantize_layer(self, ctx: LayerContext):
        out = {}
        for n in ctx.linears:
            grid = ctx.grids[n]
            if not isinstance(grid, Bnb4Grid):
                raise TypeError(f"{self.name} cannot quantize onto {grid!r}")
            out[n] = quantize_weight(ctx.weight(n), grid, name=f"{ctx.prefix}{n}")
        return out


class FP4(NF4):
    """bitsandbytes FP4 (1 sign, 2 exponent, 1 mantissa bit), same blocks and double quantization as NF4."""

    name = "fp4"
    description = "bitsandbytes FP4 (e2m1-like 4-bit float, blockwise absmax, double quantization); --format bnb"
    scheme = "fp4"

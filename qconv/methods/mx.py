"""MXFP4 and NVFP4 as methods: E2M1 codes under per-block scales, the scales searched for least (optionally
activation-weighted) squared error instead of the spec's naive exponent rule (qconv.quant.mx)."""

from __future__ import annotations

import torch

from qconv.errors import InputError
from qconv.methods.base import LayerContext, Method
from qconv.options import Option
from qconv.quant import mx
from qconv.quant.tensor import GGMLGrid

_OPTIONS = (
    Option(
        "mx_search",
        str,
        "mse",
        "block scale: the spec's rule (naive) or the least-squares best of its neighbours (mse)",
        choices=("naive", "mse"),
    ),  # fmt: skip
    Option("mx_weighted", bool, False, "weight the scale search by calibration mean x² per input column"),
)


class _FP4Method(Method):
    kind = ""
    options = _OPTIONS

    @property
    def needs_calibration(self) -> bool:
        x = self.options.extra
        return bool(x.get("mx_weighted")) and not x.get("no_calib", False)

    def importance(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
        if not self.needs_calibration or ctx.collect is None:
            return {}
        stats = ctx.collect({name: {"sq_mean"} for name in ctx.linears})
        return {n: s.sq_mean for n, s in stats.items()}

    def quantize_layer(self, ctx: LayerContext) -> dict:
        search = str(self.options.extra.get("mx_search", "mse"))
        imp = self.importance(ctx)
        out = {}
        for name in ctx.linears:
            try:
                out[name] = quantize_fp4(ctx.weight(name), ctx.grids[name], self.kind, search, imp.get(name))
            except ValueError as e:
                raise InputError(f"{ctx.prefix}{name}: {e}") from None
        return out


def quantize_fp4(w: torch.Tensor, grid, kind: str, search: str, importance: torch.Tensor | None):
    """One weight [out, in] onto an FP4Grid, or (mxfp4) onto GGUF's MXFP4 block type."""
    if isinstance(grid, GGMLGrid):
        from qconv.formats.ggml_blocks import GGMLType

        if kind != "mxfp4" or grid.ggml_type != GGMLType.MXFP4:
            raise ValueError(f"{kind} cannot be stored as GGUF {grid.name}")
        # ggml dequantizes in float32: search the scales for that
        qt = mx.quantize_mxfp4(w, mx.FP4Grid("mxfp4", torch.float32), search, importance)
        return mx.to_ggml(qt, grid)
    if not isinstance(grid, mx.FP4Grid) or grid.kind != kind:
        raise ValueError(f"{kind} cannot quantize onto {grid!r}")
    if kind == "mxfp4":
        return mx.quantize_mxfp4(w, grid, search, importance)
    return mx.quantize_nvfp4(w, grid, search, importance)


class MXFP4(_FP4Method):
    name = "mxfp4"
    kind = "mxfp4"
    scheme = "mxfp4"
    description = "MXFP4 (OCP MX): E2M1 per 32 with a searched E8M0 exponent; compressed-tensors, gpt-oss, GGUF"


class NVFP4(_FP4Method):
    name = "nvfp4"
    kind = "nvfp4"
    scheme = "nvfp4"
    description = "NVFP4: E2M1 per 16 with searched E4M3 block scales and an FP32 global scale; compressed-tensors"

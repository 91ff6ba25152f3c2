"""AWQ as a method, and AWQ followed by GPTQ on the scaled weights (``awq+gptq``).

Per layer: one calibration pass collects, for each group of linears sharing an input (q/k/v ← input norm, o ← v,
gate/up ← post-attention norm, down ← up), mean |x|, mean x² and a sample of input rows. Each group's scales are
searched on the float layer and folded in (the norm's weight or the previous linear's rows divided by s, the group's
weights multiplied by s: the float layer computes the same function). Then every linear is quantized: RTN with the
weighted clipping search on integer grids (the importance being mean x² of the scaled inputs), or GPTQ.
"""

from __future__ import annotations

import torch
from torch import nn

from qconv.errors import InputError
from qconv.methods.base import LayerContext, Method, rtn_fallback
from qconv.methods.gptq import GPTQ
from qconv.methods.rtn import rtn
from qconv.quant.awq import search_scales
from qconv.quant.tensor import IntGrid, Quantized


class AWQ(Method):
    name = "awq"
    description = "AWQ: activation-aware per-channel scales folded into the previous op, then clipped RTN"

    @property
    def needs_calibration(self) -> bool:
        return True

    def _quantizer(self, grid):
        def q(w: torch.Tensor) -> torch.Tensor:
            return rtn(w, grid).dequantize(torch.float32)

        return q

    def apply_scales(self, ctx: LayerContext) -> dict[str, torch.Tensor]:
        """Search and fold every group's scales; returns mean x² of each linear's (scaled) input."""
        if ctx.collect is None:
            raise InputError(f"{self.name} needs calibration data (drop --no-calib)")
        groups = ctx.sequential_groups()
        stats = ctx.collect({grp.linears[0]: {"abs_mean", "sq_mean", "sample"} for grp in groups})
        sq_mean: dict[str, torch.Tensor] = {}
        self.starved = set()
        for grp in groups:
            g, src_name = grp.linears, grp.feeds_from
            st = stats[g[0]]
            if st.count == 0:  # no calibration token reached these linears (an unrouted expert): no scales
                self.starved.update(g)
                continue
            src = ctx.layer.get_submodule(src_name) if src_name else None
            foldable = src is not None and _can_fold(src, ctx.layer.get_submodule(g[0]).in_features)
            s = None
            if foldable:
                ws = [ctx.weight(n) for n in g]
                qs = [self._quantizer(ctx.grids[n]) for n in g]
                s, alpha, _ = search_scales(st.sample, st.abs_mean, ws, lambda w, k, qs=qs: qs[k](w))
                if alpha == 0.0:
                    s = None
            if s is not None:
                _fold(src, s, ctx, src_name)
                for n in g:
                    lin = ctx.layer.get_submodule(n)
                    lin.weight.data = (lin.weight.data.float() * s.to(lin.weight.device)).to(lin.weight.dtype)
            for n in g:
                sq_mean[n] = st.sq_mean if s is None else st.sq_mean / s.square()
            del st
        return sq_mean

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Quantized]:
        sq = self.apply_scales(ctx)
        out: dict[str, Quantized] = {}
        for n in ctx.linears:
            grid = ctx.grids[n]
            if n in self.starved:
                out[n] = rtn_fallback(rtn(ctx.weight(n), grid, self.options.clip))
                continue
            clip = "mse" if isinstance(grid, IntGrid) else self.options.clip
            out[n] = rtn(ctx.weight(n), grid, clip, sq.get(n))
        return out


class AWQGPTQ(AWQ):
    name = "awq+gptq"
    description = "AWQ scales folded in, then GPTQ on the scaled weights"

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Quantized]:
        self.apply_scales(ctx)
        return GPTQ(self.options).quantize_layer(ctx)


def _can_fold(src: nn.Module, in_features: int) -> bool:
    """A norm with a weight of the input's width, or a linear whose output is that input (no GQA mismatch)."""
    if isinstance(src, nn.Linear):
        return src.out_features == in_features
    w = getattr(src, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == in_features


def _fold(src: nn.Module, s: torch.Tensor, ctx: LayerContext, src_name: str) -> None:
    """Divide what ``src`` outputs by s, exactly: a norm's weight, or a linear's output rows (and bias)."""
    s = s.to(src.weight.device)
    if isinstance(src, nn.Linear):
        src.weight.data = (src.weight.data.float() / s[:, None]).to(src.weight.dtype)
        if src.bias is not None:
            src.bias.data = (src.bias.data.float() / s).to(src.bias.dtype)
            ctx.overrides[f"{src_name}.bias"] = src.bias.data
        if src_name not in ctx.linears:  # a linear kept dense: the pipeline writes it from here
            ctx.overrides[f"{src_name}.weight"] = src.weight.data
    else:
        src.weight.data = (src.weight.data.float() / s).to(src.weight.dtype)
        ctx.overrides[f"{src_name}.weight"] = src.weight.data

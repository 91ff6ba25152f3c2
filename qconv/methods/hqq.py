"""HQQ as a method: calibration-free half-quadratic fitting of zero points (and scales) per group, onto
* HQQGrid (``--format hqq``): float zero points, groups along axis 0 or 1, as HQQLinear stores them;
* IntGrid (``--format safetensors``): integer zero points (compressed-tensors' asymmetric int);
* GGML Q4_1 / Q5_1 / Q4_K (``--format gguf``): HQQ's per-block scale and zero are the block's d and m."""

from __future__ import annotations

import torch

from qconv.errors import InputError
from qconv.methods.base import LayerContext, Method
from qconv.options import Option
from qconv.quant import hqq
from qconv.quant.hqq import GGML_TYPES, quantize_ggml
from qconv.quant.tensor import GGMLGrid, IntGrid, Quantized


class HQQ(Method):
    name = "hqq"
    description = "HQQ: half-quadratic lp (p<1) fit of zero points and scales, no calibration; hqq/safetensors/GGUF"
    options = (
        Option("hqq_iters", int, 20, "optimiser iterations"),
        Option("lp_norm", float, 0.7, "p of the lp loss (0 < p ≤ 1)"),
        Option("beta", float, 10.0, "initial β of the half-quadratic splitting"),
        Option("kappa", float, 1.01, "β grows by κ each iteration (> 1)"),
        Option(
            "axis",
            int,
            1,
            "HQQLinear grouping axis (--format hqq): 1 = input columns, 0 = hqq's strided groups",
            choices=(0, 1),
        ),  # fmt: skip
        Option(
            "optimize_scale",
            bool,
            True,
            "refit the scale each iteration too (false = zero points only, as the hqq package)",
        ),  # fmt: skip
        Option(
            "int_zero",
            str,
            "project",
            "integer zero points (compressed-tensors): round inside every iteration "
            "(project) or once at the end (round), then refit the scale",
            choices=("project", "round"),
        ),  # fmt: skip
        Option("early_stop", bool, True, "stop once no group improves"),
    )

    def __init__(self, options):
        super().__init__(options)
        self.config()  # bad --opt values fail before any work

    def config(self) -> hqq.HQQConfig:
        x = self.options.extra
        cfg = hqq.HQQConfig(
            iters=int(x.get("hqq_iters", 20)),
            lp_norm=float(x.get("lp_norm", 0.7)),
            beta=float(x.get("beta", 10.0)),
            kappa=float(x.get("kappa", 1.01)),
            early_stop=bool(x.get("early_stop", True)),
            optimize_scale=bool(x.get("optimize_scale", True)),
            int_zero=str(x.get("int_zero", "project")),
        )
        if not 0 < cfg.lp_norm <= 1:
            raise InputError(f"--opt lp_norm={cfg.lp_norm}: HQQ needs 0 < p ≤ 1")
        if cfg.beta <= 0 or cfg.kappa <= 1 or cfg.iters < 1:
            raise InputError("--opt beta must be > 0, kappa > 1 and hqq_iters ≥ 1")
        return cfg

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Quantized]:
        cfg = self.config()
        out = {}
        # On a GPU the linears on one integer/HQQ grid are fitted as one batch (same result as one by one, a fraction
        # of the kernel launches that bound the time there); on a CPU, where the arithmetic does, one at a time keeps
        # the temporaries to one linear's. GGML grids and quantize_one's checks go one linear at a time.
        batch: dict[object, list[str]] = {}
        for name in ctx.linears:
            grid = ctx.grids[name]
            batchable = isinstance(grid, IntGrid) and not grid.symmetric and not grid.act_order
            if batchable and ctx.weight(name).is_cuda:
                batch.setdefault(grid, []).append(name)
                continue
            try:
                out[name] = quantize_one(ctx.weight(name), grid, cfg)
            except ValueError as e:
                raise InputError(f"{ctx.prefix}{name}: {e}") from None
        for grid, names in batch.items():
            try:
                qts = hqq.quantize_many([ctx.weight(n) for n in names], grid, cfg)
            except ValueError as e:
                raise InputError(f"{ctx.prefix}{'/'.join(names)}: {e}") from None
            out.update(zip(names, qts))
        return {n: out[n] for n in ctx.linears}


def quantize_one(w: torch.Tensor, grid, cfg: hqq.HQQConfig):
    """One weight [out, in] onto its target grid."""
    if isinstance(grid, hqq.HQQGrid):
        return hqq.quantize_hqq(w, grid, cfg)
    if isinstance(grid, IntGrid):
        if grid.symmetric:
            raise ValueError("HQQ fits zero points: use --asym")
        if grid.act_order:
            raise ValueError("HQQ has no act-order")
        return hqq.quantize_int(w, grid, cfg)
    if isinstance(grid, GGMLGrid):
        if grid.ggml_type not in GGML_TYPES:
            # types without a float zero (Q5_0, Q6_K, … that llama.cpp's mixes put beside Q4_1/Q4_K): llama.cpp's fit
            from qconv.methods.rtn import rtn

            return rtn(w, grid)
        return quantize_ggml(w, grid, cfg)
    raise ValueError(f"HQQ cannot quantize onto {grid!r}")

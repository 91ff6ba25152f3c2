"""GPTQ as a method: true-sequential inside each layer (q/k/v, then o, then gate/up, then down), each step's Hessian
accumulated from calibration inputs that already pass through the quantized earlier steps."""

from __future__ import annotations

from qconv.errors import InputError
from qconv.methods.base import LayerContext, Method, rtn_fallback
from qconv.methods.rtn import rtn
from qconv.quant.gptq import GPTQConfig, gptq_ggml, gptq_int_many
from qconv.quant.tensor import GGMLGrid, IntGrid, Quantized


class GPTQ(Method):
    """Options (``MethodOptions.extra``): damp (fraction of the mean Hessian diagonal, default 0.01), act_order,
    static_groups, gptq_block (lazy-update width, default 128). ``clip`` as for RTN, applied to each group."""

    name = "gptq"
    description = "GPTQ: Hessian-guided error feedback (act-order, static groups); int groups or GGUF block types"

    @property
    def needs_calibration(self) -> bool:
        return True

    def config(self) -> GPTQConfig:
        x = self.options.extra
        return GPTQConfig(
            damp=float(x.get("damp", 0.01)),
            block=int(x.get("gptq_block", 128)),
            act_order=bool(x.get("act_order", False)),
            static_groups=bool(x.get("static_groups", False)),
            clip=self.options.clip,
        )

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Quantized]:
        if ctx.collect is None:
            raise InputError("gptq needs calibration data (drop --no-calib)")
        cfg = self.config()
        out: dict[str, Quantized] = {}
        for group in (g.linears for g in ctx.sequential_groups()):
            # One Hessian per group: its linears read the same input.
            stats = ctx.collect({group[0]: {"xtx"}})
            st = stats.pop(group[0])
            tokens = st.count
            h = st.xtx.div_(max(tokens, 1))  # the Hessian XᵀX/n, in place: one [in, in] copy fewer
            st.xtx = None
            for names in _stacks(group, ctx.grids) if tokens else [[n] for n in group]:
                try:
                    grid = ctx.grids[names[0]]
                    if tokens == 0:  # no Hessian at all (an expert never routed to): nothing to feed back
                        done = [rtn_fallback(rtn(ctx.weight(names[0]), grid, self.options.clip))]
                    elif isinstance(grid, IntGrid):
                        done = [qt for qt, _ in gptq_int_many([ctx.weight(n) for n in names], h, grid, cfg)]
                    elif isinstance(grid, GGMLGrid):
                        done = [gptq_ggml(ctx.weight(names[0]), h, grid, cfg)[0]]
                    else:
                        raise TypeError(f"GPTQ cannot quantize onto {grid!r}")
                except ValueError as e:
                    raise InputError(f"{ctx.prefix}{','.join(names)}: {e}") from None
                for name, qt in zip(names, done, strict=True):
                    # Later groups must see this linear as loaders will compute it.
                    ctx.set_weight(name, qt.dequantize())
                    out[name] = qt
            del h, st, stats
        return out


def _stacks(names: list[str], grids: dict) -> list[list[str]]:
    """Linears of one Hessian group that GPTQ runs stacked (same integer grid: q/k/v, gate/up); others alone
    (GGUF block types differ per tensor in llama.cpp's mixes and run one by one)."""
    out: list[list[str]] = []
    for n in names:
        g = grids[n]
        if isinstance(g, IntGrid) and out and grids[out[-1][0]] == g:
            out[-1].append(n)
        else:
            out.append([n])
    return out

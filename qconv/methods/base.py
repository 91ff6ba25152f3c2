"""What a quantization method is: a function from one decoder layer (+ calibration statistics) to codes.

Methods know nothing of file formats: the target grid of each linear (bits, groups, scale dtype, …) is decided by
the pipeline from the user's options and the format's constraints, and handed to the method in the context.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from qconv.model.arch import LinearGroup
from qconv.quant.tensor import Grid, Quantized
from qconv.stats import LinearStats


@dataclass(frozen=True)
class MethodOptions:
    """User options every method may read (method-specific ones go in ``extra``)."""

    clip: str = "minmax"
    extra: dict = field(default_factory=dict)


@dataclass
class LayerContext:
    """One decoder layer as a method sees it.

    layer: the live module (float weights on the compute device); linears: names relative to the layer
    (e.g. "self_attn.q_proj") of the linears to quantize, in execution order; grids: target grid per linear;
    collect: runs the calibration inputs through the layer *as it is now* and returns the requested statistics
    per linear (None when the run has no calibration data).
    """

    index: int
    layer: nn.Module
    linears: list[str]
    grids: dict[str, Grid]
    collect: Callable[[dict[str, Iterable[str]]], dict[str, LinearStats]] | None
    prefix: str = ""  # full-name prefix of this layer's modules, e.g. "model.layers.3."
    # Linears reading the same input, in execution order (q/k/v, o, gate/up, down), each with the op producing
    # that input: the true-sequential steps, and where AWQ folds its scales.
    groups: list[LinearGroup] = field(default_factory=list)
    # Tensors of this layer a method changed besides its linears (e.g. AWQ-scaled norms), by name relative to the
    # layer ("input_layernorm.weight"): the pipeline writes these instead of the checkpoint's.
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)

    def sequential_groups(self) -> list[LinearGroup]:
        """``groups`` restricted to ``linears`` (each linear a group of its own, fed by nothing known, when none
        are given)."""
        if not self.groups:
            return [LinearGroup((n,), "") for n in self.linears]
        wanted = set(self.linears)
        kept = (LinearGroup(tuple(n for n in g.linears if n in wanted), g.feeds_from) for g in self.groups)
        return [g for g in kept if g.linears]

    def weight(self, name: str) -> torch.Tensor:
        return self.layer.get_submodule(name).weight.data

    def set_weight(self, name: str, w: torch.Tensor) -> None:
        lin = self.layer.get_submodule(name)
        lin.weight.data = w.to(lin.weight.dtype)


def rtn_fallback(qt: Quantized) -> Quantized:
    """Mark ``qt`` as the defined fallback for a linear no calibration token reached (an MoE expert the router never
    chose): plain RTN on the same grid. The marks land in the manifest's per-tensor figures."""
    qt.stats["calib_tokens"] = 0.0
    qt.stats["fallback_rtn"] = 1.0
    return qt


class Method(ABC):
    """A quantization method. Subclasses set ``name`` and implement ``quantize_layer``."""

    name: str = ""
    description: str = ""
    # The grid family the method produces: "int" (IntGrid, or GGML block grids for GGUF), or a family of its own
    # ("nf4", "fp8", "mxfp4", …). Formats declare the families they can store (FormatWriter.schemes).
    scheme: str = "int"
    # Settings read from MethodOptions.extra, given on the command line as --opt KEY=VALUE (qconv.options).
    options: tuple = ()

    def __init__(self, options: MethodOptions):
        self.options = options

    @property
    def needs_calibration(self) -> bool:
        return False

    @abstractmethod
    def quantize_layer(self, ctx: LayerContext) -> dict[str, Quantized]:
        """Quantize ``ctx.linears``; return name → QuantizedTensor. The pipeline writes the dequantized weights
        back into the layer afterwards (a method may do it earlier, e.g. between true-sequential groups)."""

"""compressed-tensors ``float-quantized`` FP8 E4M3 (what llm-compressor's FP8 / FP8_DYNAMIC / FP8_BLOCK schemes
write; transformers, vLLM and compressed-tensors load it).

Per quantized linear ``P`` (weight [out, in]; layout and dequantization: ``qconv.kernels.fp8``):
  P.weight        float8_e4m3fn [out, in]
  P.weight_scale  float32 [1] (tensor) | [out, 1] (channel) | [ceil(out/b), ceil(in/b)] (block)
  P.input_scale   float32 [1]  static activations only
config group: weights {num_bits 8, type float, strategy tensor|channel|block, block_structure}, input_activations
{num_bits 8, type float, strategy tensor (static) | token (dynamic)} or null (weight-only), format float-quantized.
compressed-tensors dequantizes as weight.to(scale dtype) · scale; the scales here are float32.
"""

from __future__ import annotations

import torch

from qconv.errors import InputError
from qconv.formats.compressed_tensors import CTScheme, _register
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels.fp8 import expand_scale
from qconv.quant.fp8 import FP8_DTYPE, SCALE_KINDS, Fp8Grid, Fp8Tensor


def fp8_grid(name: str, req, dtype: torch.dtype, default_kind: str, kinds: tuple[str, ...] = SCALE_KINDS) -> Fp8Grid:
    """The Fp8Grid a format gives ``name`` from the method's --opt values (``req.options``)."""
    o = req.options
    kind = o.get("fp8_scale", "auto")
    kind = default_kind if kind == "auto" else kind
    if kind not in kinds:
        raise InputError(f"--opt fp8_scale={kind}: this format stores {', '.join(kinds)} weight scales")
    block = int(o.get("fp8_block", 128))
    if block < 1:
        raise InputError(f"--opt fp8_block={block}: the block edge must be positive")
    return Fp8Grid(kind, block, bool(o.get("fp8_search", False)), o.get("activations", "dynamic"), dtype)


def fp8_tensors(qt: Fp8Tensor, scale_name: str = "weight_scale") -> dict[str, torch.Tensor]:
    out = {"weight": qt.weight.to(FP8_DTYPE), scale_name: qt.scale.float()}
    if qt.input_scale is not None:
        out["input_scale"] = qt.input_scale.float().reshape(1)
    return out


class Fp8CTScheme(CTScheme):
    scheme = "fp8"
    formats = ("float-quantized",)
    suffixes = ("weight", "weight_scale", "input_scale")

    def grid_for(self, name, shape, req, dtype) -> Fp8Grid:
        return fp8_grid(name, req, dtype, default_kind="channel")

    def specs(self, name, shape, grid: Fp8Grid) -> list[TensorSpec]:
        specs = [
            TensorSpec(f"{name}.weight", tuple(shape), FP8_DTYPE),
            TensorSpec(f"{name}.weight_scale", grid.scale_shape(shape), torch.float32),
        ]
        if grid.activations == "static":
            specs.append(TensorSpec(f"{name}.input_scale", (1,), torch.float32))
        return specs

    def pack_verified(self, name, qt: Fp8Tensor, verifier) -> dict[str, torch.Tensor]:
        if not isinstance(qt, Fp8Tensor):
            raise TypeError(f"{name}: the fp8 scheme stores Fp8Tensor values, got {type(qt).__name__}")
        tensors = fp8_tensors(qt)
        if qt.grid.activations == "static" and "input_scale" not in tensors:
            raise ValueError(f"{name}: static activations but no input scale was calibrated")
        verifier.check(name, "fp8", qt.dequantize(torch.float32), weight=tensors["weight"],
                       scale=tensors["weight_scale"], block_size=qt.grid.block_size)  # fmt: skip
        return tensors

    def group(self, grid: Fp8Grid, ctx, observer):
        weights = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "group_size": None,
            "strategy": grid.kind,
            "block_structure": [grid.block, grid.block] if grid.kind == "block" else None,
            "dynamic": False,
            "actorder": None,
            "observer": "mse" if grid.search else "minmax",
            "observer_kwargs": {},
        }
        acts = None
        if grid.activations != "none":
            static = grid.activations == "static"
            acts = {
                "num_bits": 8,
                "type": "float",
                "symmetric": True,
                "group_size": None,
                "strategy": "tensor" if static else "token",
                "block_structure": None,
                "dynamic": not static,
                "actorder": None,
                "observer": "minmax" if static else None,
                "observer_kwargs": {},
            }
        return weights, "float-quantized", acts

    def dequantize(self, tensors, weights, fmt) -> torch.Tensor:
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise InputError(f"float-quantized weights of type {weights.get('type')}/{weights.get('num_bits')} bits "
                             "are not FP8 E4M3")  # fmt: skip
        try:
            q, scale = tensors["weight"], tensors["weight_scale"]
        except KeyError as e:
            raise InputError(f"missing tensor {e.args[0]!r}") from None
        if q.dtype != FP8_DTYPE or q.dim() != 2:
            raise InputError(f"weight is {q.dtype} {tuple(q.shape)}, expected a 2-D float8_e4m3fn tensor")
        strategy = weights.get("strategy")
        block = weights.get("block_structure") if strategy == "block" else None
        shape = tuple(q.shape)
        if strategy == "tensor":
            expected: tuple[int, ...] = (1,)
        elif strategy == "channel":
            expected = (shape[0], 1)
        elif strategy == "block" and block:
            expected = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
        else:
            raise InputError(f"FP8 weight strategy {strategy!r} is not readable (tensor, channel, block)")
        if scale.numel() != _numel(expected):
            raise InputError(f"weight_scale {tuple(scale.shape)} does not fit strategy {strategy!r} of {shape}")
        # compressed-tensors computes in the scale's dtype: weight.to(scale.dtype) · scale
        s = expand_scale(scale.reshape(expected), shape, tuple(block) if block else None)
        return q.to(scale.dtype) * s.to(scale.dtype)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# compressed_tensors.py registers SCHEMES when it is imported first; when this module is, it registers itself
SCHEMES = (Fp8CTScheme(),)
_register(*SCHEMES)

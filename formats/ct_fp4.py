"""compressed-tensors ``mxfp4-pack-quantized`` and ``nvfp4-pack-quantized`` (weight-only: MXFP4A16 / NVFP4A16).

Per quantized linear ``P`` (weight [out, in]; layout in qconv.kernels.mx):
  P.weight_packed        uint8 [out, in/2]
  P.weight_scale         uint8 [out, in/32] E8M0 (mxfp4) | float8_e4m3fn [out, in/16] (nvfp4)
  P.weight_global_scale  float32 [1] (nvfp4: block scales are divided by it)
Config group weights as compressed-tensors' MXFP4A16 / NVFP4A16 presets.
"""

from __future__ import annotations

import torch

from qconv.errors import InputError
from qconv.formats.compressed_tensors import CTScheme, _register, suggest_groups
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels.mx import ct_fp4_reference, pack_nibbles
from qconv.quant.mx import FP4Grid, FP4Tensor


class FP4Scheme(CTScheme):
    """One FP4 family ("mxfp4" or "nvfp4") in compressed-tensors."""

    def __init__(self, kind: str):
        self.kind = kind
        self.scheme = kind
        self.formats = (f"{kind}-pack-quantized",)
        self.suffixes = ("weight_packed", "weight_scale") + (("weight_global_scale",) if kind == "nvfp4" else ())

    def grid_for(self, name, shape, req, dtype) -> FP4Grid:
        grid = FP4Grid(self.kind, torch.bfloat16)
        if req.bits != 4:
            raise InputError(f"--bits {req.bits}: {self.kind} stores 4-bit E2M1 elements")
        if shape[1] % grid.block:
            raise InputError(
                f"{name}: {self.kind} needs input columns in blocks of {grid.block}; it has {shape[1]} "
                f"(group sizes that divide it: {suggest_groups(shape[1])})"
            )
        return grid

    def specs(self, name, shape, grid: FP4Grid) -> list[TensorSpec]:
        out_f, in_f = shape
        sdt = torch.uint8 if self.kind == "mxfp4" else torch.float8_e4m3fn
        specs = [
            TensorSpec(f"{name}.weight_packed", (out_f, in_f // 2), torch.uint8),
            TensorSpec(f"{name}.weight_scale", (out_f, in_f // grid.block), sdt),
        ]
        if self.kind == "nvfp4":
            specs.append(TensorSpec(f"{name}.weight_global_scale", (1,), torch.float32))
        return specs

    def tensors(self, qt: FP4Tensor) -> dict[str, torch.Tensor]:
        out = {"weight_packed": pack_nibbles(qt.codes), "weight_scale": qt.scales.contiguous()}
        if self.kind == "nvfp4":
            out["weight_global_scale"] = qt.global_scale.float().reshape(1)
        return out

    def pack_verified(self, name, qt: FP4Tensor, verifier) -> dict[str, torch.Tensor]:
        t = self.tensors(qt)
        verifier.check(name, "ct-fp4", qt.dequantize(torch.float32), **kernel_args(t, qt.shape, qt.grid.block))
        return t

    def group(self, grid: FP4Grid, ctx, observer):
        weights = {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": grid.block,
            "strategy": "tensor_group" if self.kind == "nvfp4" else "group",
            "block_structure": None,
            "dynamic": False,
            "actorder": None,
            "observer": observer,
            "observer_kwargs": {},
            "scale_dtype": "torch.float8_e4m3fn" if self.kind == "nvfp4" else "torch.uint8",
            "zp_dtype": None,
        }
        return weights, self.formats[0], None

    def dequantize(self, tensors, weights, fmt) -> torch.Tensor:
        if weights.get("type") != "float" or weights.get("num_bits") != 4:
            raise InputError(f"{fmt}: expected 4-bit float weights, config says {weights.get('num_bits')}-bit "
                             f"{weights.get('type')}")  # fmt: skip
        need = ("weight_packed", "weight_scale", *(("weight_global_scale",) if self.kind == "nvfp4" else ()))
        missing = [s for s in need if s not in tensors]
        if missing:
            raise InputError(f"packed tensor {missing[0]!r} is missing")
        packed = tensors["weight_packed"]
        shape = (packed.shape[0], packed.shape[1] * 2)
        block = MX_OR_NV_BLOCK[self.kind]
        scale = tensors["weight_scale"]
        if scale.shape != (shape[0], shape[1] // block):
            raise InputError(f"weight_scale has shape {tuple(scale.shape)}, expected {(shape[0], shape[1] // block)}")
        return ct_fp4_reference(**kernel_args(tensors, shape, block)).to(torch.bfloat16)


MX_OR_NV_BLOCK = {"mxfp4": 32, "nvfp4": 16}


def kernel_args(t: dict[str, torch.Tensor], shape: tuple[int, int], block: int) -> dict:
    return {
        "packed": t["weight_packed"],
        "scale": t["weight_scale"],
        "shape": tuple(shape),
        "global_scale": t.get("weight_global_scale"),
        "block": block,
    }


SCHEMES = (FP4Scheme("mxfp4"), FP4Scheme("nvfp4"))
_register(*SCHEMES)

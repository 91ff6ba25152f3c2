"""Dequantization of packed FP4 (E2M1) layouts.

"ct-fp4" — compressed-tensors mxfp4-pack-quantized / nvfp4-pack-quantized, per linear with weight [out, in]:
  weight_packed        uint8 [out, in/2]: element 2i in the low nibble, 2i+1 in the high (nibble = sign·8 + index)
  weight_scale         [out, in/block]: uint8 E8M0 exponents (mxfp4, block 32) or float8_e4m3fn (nvfp4, block 16)
  weight_global_scale  float32 [1] (nvfp4 only): effective block scale = fl32(weight_scale / global_scale)
  w = bf16(e2m1 · effective scale) — compressed-tensors' decompression ends in bfloat16.
  Keywords: (packed, scale, shape, global_scale=None, block=32) → float32 [out, in].

"gptoss-mxfp4" — transformers' Mxfp4 layout (gpt-oss): ``*_blocks`` uint8 [..., rows, in/32, 16] (two E2M1 codes a
byte, low nibble first) and ``*_scales`` uint8 [..., rows, in/32] E8M0 exponents; w = e2m1 · 2^(scale − 127).
  Keywords: (blocks, scales, out_dtype=torch.bfloat16) → float32 [..., rows, in].
"""

from __future__ import annotations

import torch

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., 2n] (values < 16) → uint8 [..., n], element 2i in the low nibble (unpack_nibbles' inverse)."""
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 2)
    return (c[..., 0] | (c[..., 1] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n] → codes uint8 [..., 2n] (low nibble first)."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def e2m1(codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_E2M1, dtype=torch.float32, device=codes.device)[codes.long()]


def e8m0(e: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32) - 127)


def ct_fp4_reference(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: tuple[int, int],
    global_scale: torch.Tensor | None = None,
    block: int = 32,
) -> torch.Tensor:
    """Plain torch: float32 [out, in] equal to compressed-tensors' decompression (bfloat16) widened."""
    out_f, in_f = shape
    v = e2m1(unpack_nibbles(packed)).reshape(out_f, in_f // block, block)
    if scale.dtype == torch.uint8:
        eff = e8m0(scale)
    else:
        eff = scale.float() if global_scale is None else scale.float() / global_scale.float()
    return (v * eff[..., None]).reshape(out_f, in_f).to(torch.bfloat16).float()


def gptoss_reference(
    blocks: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Plain torch: float32 [..., rows, in] from gpt-oss ``_blocks`` / ``_scales`` (rounded to ``out_dtype``)."""
    v = e2m1(unpack_nibbles(blocks))  # [..., rows, in/32, 32]
    w = v * e8m0(scales)[..., None]
    return w.reshape(*blocks.shape[:-2], -1).to(out_dtype).float()

"""Dequantization of FP8 E4M3 weights with per-tensor, per-channel or 2-D block scales.

Layouts (weight [out, in] float8_e4m3fn, scale float32):
  compressed-tensors float-quantized   weight, weight_scale [1] (tensor) | [out, 1] (channel) |
                                       [ceil(out/bh), ceil(in/bw)] (block), input_scale [1] (static activations)
  DeepSeek-V3 / transformers "fp8"     weight, weight_scale_inv [ceil(out/bh), ceil(in/bw)]
  w[o, i] = float(weight[o, i]) · scale[o // bh, i // bw]   (one float32 product; edge blocks may be partial)

The reference below and a Triton kernel share this keyword signature; both return float32 [out, in].
"""

from __future__ import annotations

import torch


def expand_scale(scale: torch.Tensor, shape: tuple[int, int], block_size: tuple[int, int] | None) -> torch.Tensor:
    """float32 scale broadcastable to ``shape``: a scalar / [1] / [out, 1] as is, block scales repeated over their
    bh × bw blocks (the last row and column of blocks cut to the weight's edge)."""
    s = scale.float()
    if block_size is None or s.numel() == 1:
        return s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1)
    bh, bw = block_size
    rows, cols = shape
    return s.repeat_interleave(bh, dim=0)[:rows].repeat_interleave(bw, dim=1)[:, :cols]


def dequant_reference(
    weight: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Plain torch: float32 [out, in] = weight (fp8, exact in float32) × its scale."""
    shape = tuple(weight.shape)
    return weight.float() * expand_scale(scale, shape, block_size)  # type: ignore[arg-type]

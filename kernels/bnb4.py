"""Dequantization of bitsandbytes' serialized 4-bit weights (NF4 / FP4, optionally double-quantized absmax).

Layout (per linear with weight [out, in], n = out·in, B = blocksize, nb = ceil(n/B)):
  weight             uint8 [ceil(n/2), 1]  two 4-bit codes per byte over the row-major flattened weight; the
                                           even element in the high nibble
  weight.absmax      float32 [nb]          per-block absmax, or uint8 [nb] codes when double-quantized
  weight.quant_map   float32 [16]          value of each 4-bit code
  weight.nested_absmax      float32 [ceil(nb/256)]  double quant: absmax of each block of 256 absmax codes
  weight.nested_quant_map   float32 [256]           double quant: bitsandbytes' 8-bit dynamic map
  quant state JSON (nested_offset = mean absmax, nested_blocksize = 256)
  absmax' = nested_quant_map[absmax]·nested_absmax[j // 256] + nested_offset   (float32, each step rounded)
  w[i]    = quant_map[code[i]] · absmax'[i // B]                              (float32)

The reference below and a Triton kernel share this keyword signature; both return float32 [out, in].
"""

from __future__ import annotations

import torch

from qconv.quant.nf4 import dequantize, dequantize_absmax


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n/2), 1] (or any shape holding ceil(n/2) bytes) → uint8 [n] codes, high nibble first."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


def pack_nibbles(codes: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """uint8 codes 0…15, any shape (n elements, row-major) → uint8 [ceil(n/2), 1], even element in the high
    nibble; an odd count is padded with the code ``pad``."""
    c = codes.reshape(-1).to(torch.uint8)
    if c.numel() % 2:
        c = torch.cat([c, c.new_full((1,), pad)])
    return ((c[0::2] << 4) | c[1::2]).unsqueeze(1)


def dequant_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: float | torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Plain torch: float32 ``shape``. ``absmax`` is uint8 exactly when the nested tensors are given."""
    n = 1
    for d in shape:
        n *= int(d)
    codes = unpack_nibbles(packed, n)
    if nested_absmax is not None:
        am = dequantize_absmax(absmax, nested_absmax, nested_offset, nested_blocksize, nested_quant_map)
    else:
        am = absmax.float()
    return dequantize(codes, am, quant_map, blocksize).reshape(shape)

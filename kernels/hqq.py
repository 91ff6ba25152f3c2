"""Dequantization of HQQLinear's packed layout (the hqq package; transformers' HqqConfig checkpoints).

Layout (per linear with weight [out, in], N = out·in, group g, G = N/g):
  codes C in the grouped shape: axis 1 → [G, g] (C = codes.reshape(G, g)); axis 0 → [g, G] (C = codes.reshape(g, G))
  W_q    packed along dim 0 of C ("rows" R = C.shape[0]):
           8bit_u8 (5, 6, 8 bits): uint8 C as is
           4bit_u8: uint8 [R/2, ·]  = C[:R/2] << 4 | C[R/2:]
           2bit_u8: uint8 [R/4, ·]  = C[0:R/4] << 6 | C[R/4:R/2] << 4 | C[R/2:3R/4] << 2 | C[3R/4:]
           1bit_u8: uint8 [R/8, ·]  = Σ_k C[kR/8:(k+1)R/8] << (7 − k)
           3bit_32: int32 [ceil(R/10), ·], rows zero-padded to a multiple of 10, chunk k at bit 27 − 3k
  scale, zero  compute dtype, [G, 1] (axis 1) or [1, G] (axis 0)
  w = ((C − zero) · scale).reshape(out, in), each operation rounded to the compute dtype (as HQQLinear does).

Keyword signature of both dequantizers: (W_q, scale, zero, shape, nbits, group_size, axis) → float32 [out, in].
"""

from __future__ import annotations

import torch

PACKING = {8: "8bit_u8", 6: "8bit_u8", 5: "8bit_u8", 4: "4bit_u8", 3: "3bit_32", 2: "2bit_u8", 1: "1bit_u8"}
_CHUNKS = {"4bit_u8": (2, 4), "2bit_u8": (4, 2), "1bit_u8": (8, 1), "3bit_32": (10, 3)}


def grouped_shape(shape: tuple[int, int], group_size: int, axis: int) -> tuple[int, int]:
    n = shape[0] * shape[1]
    return (n // group_size, group_size) if axis == 1 else (group_size, n // group_size)


def unpack_codes(w_q: torch.Tensor, nbits: int, rows: int) -> torch.Tensor:
    """W_q → uint8 codes [rows, cols] (the grouped shape)."""
    packing = PACKING[nbits]
    if packing == "8bit_u8":
        return w_q.to(torch.uint8)
    chunks, width = _CHUNKS[packing]
    x = w_q.to(torch.int64)
    mask = (1 << width) - 1
    top = 32 - 2 - width if packing == "3bit_32" else 8 - width  # bit position of chunk 0
    parts = [(x >> (top - k * width)) & mask for k in range(chunks)]
    return torch.cat(parts, dim=0)[:rows].to(torch.uint8)


def dequant_reference(
    W_q: torch.Tensor,  # noqa: N803 (the hqq package's tensor name)
    scale: torch.Tensor,
    zero: torch.Tensor,
    shape: tuple[int, int],
    nbits: int,
    group_size: int,
    axis: int,
) -> torch.Tensor:
    """Plain torch: float32 [out, in], computed in the scale's dtype like HQQLinear.dequantize."""
    rows, _ = grouped_shape(shape, group_size, axis)
    codes = unpack_codes(W_q, nbits, rows)
    dt = scale.dtype
    return ((codes.to(dt) - zero.to(dt)) * scale).reshape(shape).float()

"""Dequantization of AutoAWQ GEMM checkpoints (qweight / qzeros / scales), as gptqmodel's AWQ torch kernel does it.

Layout (per linear with weight [out, in], 4 bits, group size g dividing in, G = in / g groups, out % 8 == 0):
  qweight int32 [in, out/8]   codes packed along out: word j of row i holds W[8j + AWQ_ORDER[k], i] in nibble k
  qzeros  int32 [G, out/8]    zero points packed the same way
  scales  fp16  [G, out]
  w[o, i] = (code[i, o] − zero[i // g, o]) · scales[i // g, o]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]: the interleaving AutoAWQ's GEMM kernel unpacks in one step.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS = 4
PACK = 32 // BITS  # codes per int32 word


def nibble_of_column() -> torch.Tensor:
    """int64 [8]: the nibble that holds column c (0…7) of an 8-column block (the inverse of AWQ_ORDER)."""
    inv = torch.empty(PACK, dtype=torch.int64)
    inv[list(AWQ_ORDER)] = torch.arange(PACK)
    return inv


def unpack_awq(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """int32 [rows, columns/8] → uint8 [rows, columns] in natural column order."""
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = nibble_of_column().to(packed.device) * BITS  # column c of a block sits at bit 4·nibble(c)
    codes = (words.unsqueeze(-1) >> shifts) & 0xF  # [rows, words, 8]
    return codes.reshape(rows, -1)[:, :columns].to(torch.uint8)


def dequant_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """Plain torch: float32 [out, in] = (code − zero) · scale, exact in float32.

    Keywords: qweight int32 [in, out/8], qzeros int32 [in/group_size, out/8], scales float [G, out] (fp16 on
    disk), group_size the input columns per group. gptqmodel computes the same product in the scales' dtype (one
    rounding of this exact value).
    """
    in_f = qweight.shape[0]
    out_f = scales.shape[1]
    codes = unpack_awq(qweight, out_f).float()  # [in, out]
    zeros = unpack_awq(qzeros, out_f).float()  # [G, out]
    g = torch.arange(in_f, device=qweight.device) // group_size
    return ((codes - zeros[g]) * scales.float()[g]).T.contiguous()

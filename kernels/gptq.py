"""Dequantization of GPTQ checkpoints (qweight / qzeros / scales / g_idx), as gptqmodel's torch kernel does it.

Layout (per linear with weight [out, in], ``bits`` ∈ {2, 3, 4, 8}, G = ceil(in / group) groups):
  qweight int32 [ceil(in·bits/32), out]   codes packed along in: column o of qweight is the dense LSB-first bit
                                          stream of W[o, :] (3-bit codes straddle words: 32 codes per 3 words)
  qzeros  int32 [G, ceil(out·bits/32)]    zero points packed along out, same bit stream
  scales  fp16  [G, out]
  g_idx   int32 [in]                      group of each input column (act-order: any permutation of groups)
  w[o, i] = (code[i, o] − zero[g_idx[i], o]) · scales[g_idx[i], o]

checkpoint_format "gptq_v2" stores the zero points as they are. "gptq" (v1) stores them minus one, the way
gptqmodel converts between the two: for 2/4/8 bits by adding one to every field *as a 32-bit word* (0x11111111
for 4 bits), whose carries cross fields, so a zero point of 0 (stored as a borrow) still round-trips; for 3 bits,
whose fields straddle words, field by field modulo 2^bits. Readers that add one per unpacked field instead
(older exllama-style kernels) agree except where a zero point is 0.
"""

from __future__ import annotations

import torch

from qconv.formats.bitpack import unpack_rows

FORMATS = ("gptq", "gptq_v2")

# The per-word constant gptqmodel adds to turn v1 qzeros into v2 (one 1 in every field).
_ONES = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns → int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return (words - ((words & 0x80000000) << 1)).to(torch.int32)


def shift_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, delta: int) -> torch.Tensor:
    """Add ``delta`` (±1) to every stored zero point as gptqmodel does: v1 → v2 is +1, v2 → v1 is −1.

    qzeros: int32 [G, ceil(out·bits/32)] → the same shape and dtype.
    """
    if bits in _ONES:
        # Whole-word arithmetic modulo 2^32, exactly gptqmodel's convert_gptq_v1_to_v2_format_module.
        return as_int32(qzeros.to(torch.int64) + delta * _ONES[bits])
    from qconv.formats.bitpack import pack_rows

    fields = unpack_rows(qzeros, bits, out_features).to(torch.int64)
    return pack_rows((fields + delta) & ((1 << bits) - 1), bits)


def unpack_qweight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 [ceil(in·bits/32), out] → uint8 codes [out, in]."""
    return unpack_rows(qweight.T.contiguous(), bits, in_features)


def unpack_qzeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """int32 [G, ceil(out·bits/32)] → uint8 zero points [G, out] (v1 corrected to the true zero points)."""
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format {checkpoint_format!r}: expected one of {FORMATS}")
    if checkpoint_format == "gptq":
        qzeros = shift_qzeros(qzeros, bits, out_features, +1)
    return unpack_rows(qzeros, bits, out_features)


def dequant_reference(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> torch.Tensor:
    """Plain torch: float32 [out, in] = (code − zero) · scale, exact in float32.

    Keywords: qweight int32 [ceil(in·bits/32), out], qzeros int32 [G, ceil(out·bits/32)], scales float [G, out]
    (fp16 on disk), g_idx int [in], bits ∈ {2, 3, 4, 8}, checkpoint_format "gptq" (v1) or "gptq_v2".
    gptqmodel computes the same product in the scales' dtype: one rounding of this exact value.
    """
    in_f = g_idx.shape[0]
    out_f = scales.shape[1]
    codes = unpack_qweight(qweight, bits, in_f).float()  # [out, in]
    zeros = unpack_qzeros(qzeros, bits, out_f, checkpoint_format).float()  # [G, out]
    g = g_idx.long()
    return (codes - zeros[g].T) * scales.float()[g].T

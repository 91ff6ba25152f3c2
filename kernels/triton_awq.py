"""Triton dequantization of AutoAWQ GEMM checkpoints, beside the torch reference in ``qconv.kernels.awq`` and with
its keyword signature:

  qweight int32 [in, out/8], qzeros int32 [in/group_size, out/8], scales float [G, out], group_size
  →  float32 [out, in] = (code − zero) · scale.

Each program fills a [BLOCK_O, BLOCK_I] tile of the output: element (o, i) reads nibble AWQ_ORDER⁻¹[o % 8] of
qweight[i, o // 8] and of qzeros[i // group_size, o // 8], and scales[i // group_size, o]. The inverse of
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7) is c ↦ 4·(c mod 2) + c // 2.
"""

from __future__ import annotations

import torch

from qconv.kernels._triton import HAVE_TRITON, lazy_jit, tl, triton
from qconv.kernels.awq import AWQ_ORDER, PACK

# The kernel computes the nibble of column c as 4·(c mod 2) + c // 2: this is that inverse, checked at import.
assert all(AWQ_ORDER[4 * (c % 2) + c // 2] == c for c in range(PACK))

if HAVE_TRITON:

    @lazy_jit
    def _awq_dequant_kernel(
        qw_ptr, qz_ptr, sc_ptr, out_ptr,
        n_out, n_in, n_words, group_size,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        om = o < n_out
        im = i < n_in
        mask = om[:, None] & im[None, :]
        i64 = i.to(tl.int64)
        g = i64 // group_size
        c = o % 8
        shift = ((c % 2) * 4 + c // 2) * 4  # [BO]
        col = (o // 8)[:, None]
        qw = tl.load(qw_ptr + i64[None, :] * n_words + col, mask=mask, other=0)
        qz = tl.load(qz_ptr + g[None, :] * n_words + col, mask=mask, other=0)
        code = ((qw >> shift[:, None]) & 0xF).to(tl.float32)  # arithmetic shift: & 0xF drops the sign bits
        zero = ((qz >> shift[:, None]) & 0xF).to(tl.float32)
        scale = tl.load(sc_ptr + g[None, :] * n_out + o[:, None], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + o.to(tl.int64)[:, None] * n_in + i64[None, :], (code - zero) * scale, mask=mask)


def dequant_triton(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    block_o: int = 32,
    block_i: int = 128,
) -> torch.Tensor:
    """Triton kernel, same contract as ``qconv.kernels.awq.dequant_reference`` (CUDA, or CPU under
    TRITON_INTERPRET=1); ``block_o``/``block_i`` (powers of two) set the output tile."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install 'qconv[gpu]')")
    in_f, out_f = qweight.shape[0], scales.shape[1]
    out = torch.empty(out_f, in_f, dtype=torch.float32, device=qweight.device)
    if out.numel() == 0:
        return out
    qweight = qweight.contiguous()
    grid = (triton.cdiv(out_f, block_o), triton.cdiv(in_f, block_i))
    _awq_dequant_kernel[grid](
        qweight, qzeros.contiguous(), scales.contiguous(), out,
        out_f, in_f, qweight.shape[1], group_size,
        BLOCK_O=block_o, BLOCK_I=block_i, enable_fp_fusion=False,
    )  # fmt: skip
    return out

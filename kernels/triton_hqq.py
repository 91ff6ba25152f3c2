"""Triton dequantization of HQQLinear's packed layout, beside the torch reference in ``qconv.kernels.hqq`` and with
its keyword signature:

  W_q (uint8 or int32, packed along dim 0 of the grouped codes), scale, zero ([G, 1] for axis 1, [1, G] for
  axis 0; the compute dtype), shape (out, in), nbits, group_size, axis  →  float32 [out, in].

The grouped code matrix C is [R, K] = [N/g, g] (axis 1) or [g, N/g] (axis 0). W_q holds C's rows in ``chunks``
equal slices of Rp = W_q.shape[0] rows: row r of C sits in packed row r % Rp at bit ``top − (r // Rp)·width``.
Each program reads a [BLOCK_R, BLOCK_K] tile of W_q once and writes every row of C packed in it: ``chunks`` tiles
of C (rows p, p + Rp, p + 2·Rp, …; the output, flattened row-major, is C's memory). Tiling C instead made each packed
word be read once per chunk (ten times at 3 bits) from scattered rows.
HQQLinear computes ((C − zero) · scale) in the compute dtype, each operation rounded to it; here each operation is
done in float32 and rounded to the compute dtype, which gives the same bits (float32 carries more than twice the
significand bits of float16/bfloat16 plus two, so the double rounding is innocuous).
"""

from __future__ import annotations

import torch

from qconv.kernels._triton import HAVE_TRITON, lazy_jit, tl, triton
from qconv.kernels.hqq import _CHUNKS, PACKING, grouped_shape

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

if HAVE_TRITON:

    @lazy_jit
    def _hqq_dequant_kernel(
        wq_ptr, scale_ptr, zero_ptr, out_ptr,
        n_rows, n_cols, packed_rows,
        WIDTH: tl.constexpr, TOP: tl.constexpr, CHUNKS: tl.constexpr, AXIS: tl.constexpr, DT: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        p = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        pm = p < packed_rows
        km = k < n_cols
        p64 = p.to(tl.int64)
        word = tl.load(wq_ptr + p64[:, None] * n_cols + k[None, :], mask=pm[:, None] & km[None, :], other=0)
        word = word.to(tl.int32)
        for j in tl.static_range(CHUNKS):
            r64 = p64 + j * packed_rows  # row of C held by chunk j of packed row p
            mask = (pm & (r64 < n_rows))[:, None] & km[None, :]
            if WIDTH == 8:
                code = word & 0xFF
            else:
                code = (word >> (TOP - j * WIDTH)) & ((1 << WIDTH) - 1)
            if AXIS == 1:
                gi = r64[:, None] + k[None, :] * 0  # group = row of C
            else:
                gi = k.to(tl.int64)[None, :] + r64[:, None] * 0  # group = column of C
            scale = tl.load(scale_ptr + gi, mask=mask, other=0.0)
            zero = tl.load(zero_ptr + gi, mask=mask, other=0.0)
            if DT == "fp16":
                zero = zero.to(tl.float32).to(tl.float16).to(tl.float32)
                d = (code.to(tl.float32) - zero).to(tl.float16).to(tl.float32)
                w = (d * scale.to(tl.float32)).to(tl.float16).to(tl.float32)
            elif DT == "bf16":
                # float32 → bfloat16 → float32 by hand, round to nearest even on the bits (NaN kept): the
                # interpreter's own bfloat16 cast truncates, the GPU's rounds; this is the same in both.
                zero = zero.to(tl.float32)  # zero.to(bfloat16): the identity when it is stored in bfloat16
                zb = zero.to(tl.uint32, bitcast=True)
                zero = tl.where(
                    zero != zero, zero, ((zb + 0x7FFF + ((zb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
                )
                d = code.to(tl.float32) - zero
                db = d.to(tl.uint32, bitcast=True)
                d = tl.where(d != d, d, ((db + 0x7FFF + ((db >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True))
                w = d * scale.to(tl.float32)
                wb = w.to(tl.uint32, bitcast=True)
                w = tl.where(w != w, w, ((wb + 0x7FFF + ((wb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True))
            else:
                w = (code.to(tl.float32) - zero.to(tl.float32)) * scale
            tl.store(out_ptr + r64[:, None] * n_cols + k[None, :], w, mask=mask)


def dequant_triton(
    W_q: torch.Tensor,  # noqa: N803 (the hqq package's tensor name)
    scale: torch.Tensor,
    zero: torch.Tensor,
    shape: tuple[int, int],
    nbits: int,
    group_size: int,
    axis: int,
    block_r: int = 16,
    block_k: int = 128,
) -> torch.Tensor:
    """Triton kernel, same contract as ``qconv.kernels.hqq.dequant_reference`` (CUDA, or CPU under
    TRITON_INTERPRET=1); ``block_r``/``block_k`` (powers of two) set the tile of W_q each program reads."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install 'qconv[gpu]')")
    if scale.dtype not in _TL_DTYPES:
        raise ValueError(f"HQQ compute dtype {scale.dtype} is not float16, bfloat16 or float32")
    rows, cols = grouped_shape(tuple(shape), group_size, axis)
    out = torch.empty(tuple(shape), dtype=torch.float32, device=W_q.device)
    if out.numel() == 0:
        return out
    packing = PACKING[nbits]
    chunks, width = _CHUNKS.get(packing, (1, 8))  # 8bit_u8: one code per byte
    top = 32 - 2 - width if packing == "3bit_32" else 8 - width  # bit position of chunk 0, as HQQ packs
    w_q = W_q.contiguous()
    if cols < block_k:
        # grouped rows shorter than the tile (axis 1: cols = group size, often 64): narrower, taller tiles of the
        # same size, so no lanes idle behind the column mask
        narrow = triton.next_power_of_2(cols)
        block_r, block_k = block_r * (block_k // narrow), narrow
    grid = (triton.cdiv(w_q.shape[0], block_r), triton.cdiv(cols, block_k))
    _hqq_dequant_kernel[grid](
        w_q, scale.contiguous(), zero.contiguous(), out,
        rows, cols, w_q.shape[0],
        WIDTH=width, TOP=top, CHUNKS=chunks, AXIS=axis, DT=_TL_DTYPES[scale.dtype],
        BLOCK_R=block_r, BLOCK_K=block_k, enable_fp_fusion=False,
    )  # fmt: skip
    return out

"""Triton dequantization of GPTQ checkpoints (v1 "gptq" and "gptq_v2"), beside the torch reference in
``qconv.kernels.gptq`` and with its keyword signature:

  qweight int32 [ceil(in·bits/32), out], qzeros int32 [G, ceil(out·bits/32)], scales float [G, out],
  g_idx int [in], bits, checkpoint_format  →  float32 [out, in] = (code − zero) · scale.

Each program fills a [BLOCK_O, BLOCK_I] tile of the output: element (o, i) reads its code from the bit stream of
qweight's column o (fields may straddle two words: 3 bits), its group g = g_idx[i], its zero point from the bit
stream of qzeros' row g and scales[g, o]. v1 zero points are corrected as gptqmodel does: +1 added to every
field of the whole 32-bit word (2/4/8 bits, carries crossing fields), or field by field modulo 2^bits (3 bits).
One float32 subtraction (exact: small integers) and one multiplication per element, as in the reference.
"""

from __future__ import annotations

import torch

from qconv.kernels._triton import HAVE_TRITON, lazy_jit, tl, triton
from qconv.kernels.gptq import _ONES, FORMATS

if HAVE_TRITON:

    @lazy_jit
    def _gptq_dequant_kernel(
        qw_ptr, qz_ptr, sc_ptr, gidx_ptr, out_ptr,
        n_out, n_in, n_zwords,
        BITS: tl.constexpr, V1: tl.constexpr, WORD_ONES: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    ):  # fmt: skip
        o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        om = o < n_out
        im = i < n_in
        mask = om[:, None] & im[None, :]
        fmask = (1 << BITS) - 1
        o64 = o.to(tl.int64)

        # code of (o, i): bits [i·BITS, i·BITS + BITS) of column o's stream; word w of it is qweight[w, o]
        start = i * BITS
        word = start // 32
        shift = start % 32
        straddle = (shift + BITS > 32) & im
        lo = tl.load(qw_ptr + word.to(tl.int64)[None, :] * n_out + o64[:, None], mask=mask, other=0)
        code = lo.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)[None, :]
        if 32 % BITS != 0:
            hmask = om[:, None] & straddle[None, :]
            hi = tl.load(qw_ptr + (word.to(tl.int64) + 1)[None, :] * n_out + o64[:, None], mask=hmask, other=0)
            hs = tl.where(straddle, 32 - shift, 0).to(tl.uint32)  # never shift by 32
            code = code | tl.where(hmask, hi.to(tl.uint32, bitcast=True) << hs[None, :], 0)
        code = (code & fmask).to(tl.float32)

        # zero point of (g, o): bits [o·BITS, o·BITS + BITS) of row g of qzeros
        g = tl.load(gidx_ptr + i, mask=im, other=0).to(tl.int64)
        zstart = o * BITS
        zword = zstart // 32
        zshift = zstart % 32
        zstr = (zshift + BITS > 32) & om
        zlo = tl.load(qz_ptr + g[None, :] * n_zwords + zword[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)
        if V1 and WORD_ONES != 0:
            zlo = zlo + WORD_ONES  # v1 → v2 on the whole word, modulo 2^32
        zero = zlo >> zshift.to(tl.uint32)[:, None]
        if 32 % BITS != 0:
            zhmask = zstr[:, None] & im[None, :]
            zhi = tl.load(qz_ptr + g[None, :] * n_zwords + zword[:, None] + 1, mask=zhmask, other=0)
            zhs = tl.where(zstr, 32 - zshift, 0).to(tl.uint32)
            zero = zero | tl.where(zhmask, zhi.to(tl.uint32, bitcast=True) << zhs[:, None], 0)
        zero = zero & fmask
        if V1 and WORD_ONES == 0:
            zero = (zero + 1) & fmask  # v1 → v2 field by field (fields straddling words)
        scale = tl.load(sc_ptr + g[None, :] * n_out + o64[:, None], mask=mask, other=0.0).to(tl.float32)
        w = (code - zero.to(tl.float32)) * scale
        tl.store(out_ptr + o64[:, None] * n_in + i[None, :], w, mask=mask)


def dequant_triton(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
    block_o: int | None = None,
    block_i: int = 128,
) -> torch.Tensor:
    """Triton kernel, same contract as ``qconv.kernels.gptq.dequant_reference`` (CUDA, or CPU under
    TRITON_INTERPRET=1); ``block_o``/``block_i`` (powers of two) set the output tile."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install 'qconv[gpu]')")
    if checkpoint_format not in FORMATS:
        raise ValueError(f"checkpoint_format {checkpoint_format!r}: expected one of {FORMATS}")
    in_f, out_f = g_idx.shape[0], scales.shape[1]
    out = torch.empty(out_f, in_f, dtype=torch.float32, device=qweight.device)
    if out.numel() == 0:
        return out
    qzeros = qzeros.contiguous()
    if block_o is None:
        # measured on the H100 (bench/kernels_dequant.py): 3-bit fields, read as two words, run best on 16-row
        # tiles (72 % of copy vs 64 % on 32); 2/4/8 bits on 32 (16 rows lose a third with act-order's g_idx)
        block_o = 16 if 32 % bits else 32
    grid = (triton.cdiv(out_f, block_o), triton.cdiv(in_f, block_i))
    _gptq_dequant_kernel[grid](
        qweight.contiguous(), qzeros, scales.contiguous(), g_idx.to(torch.int32).contiguous(), out,
        out_f, in_f, qzeros.shape[1],
        BITS=bits, V1=checkpoint_format == "gptq", WORD_ONES=_ONES.get(bits, 0),
        BLOCK_O=block_o, BLOCK_I=block_i, enable_fp_fusion=False,
    )  # fmt: skip
    return out

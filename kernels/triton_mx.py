"""Triton dequantization of the packed FP4 (E2M1) layouts, beside the torch references in ``qconv.kernels.mx`` and
with their keyword signatures:

  ct_fp4_triton(packed uint8 [out, in/2], scale [out, in/block] (uint8 E8M0 or float8_e4m3fn), shape,
                global_scale float32 [1] | None, block)  →  float32 [out, in] = bf16(e2m1 · effective scale)
  gptoss_triton(blocks uint8 [..., rows, in/32, 16], scales uint8 [..., rows, in/32], out_dtype)
                →  float32 [..., rows, in] = out_dtype(e2m1 · 2^(scale − 127))

Scales are decoded from their bits, exactly as torch widens them: E8M0 e ↦ 2^(e − 127) (e = 0 is the subnormal
2^−127, e = 255 overflows to inf, as ``torch.ldexp`` gives); E4M3FN by sign, 4-bit exponent (bias 7, subnormals
m·2^−9) and 3-bit mantissa, 0x7F/0xFF NaN. The NVFP4 global scale divides with IEEE round-to-nearest
(``div_rn``; the default GPU division may be approximate). The product is one float32 rounding; the final rounding
to bfloat16 is done on the bits (round to nearest even), because the interpreter's own bfloat16 cast truncates.
"""

from __future__ import annotations

import math

import torch

from qconv.kernels._triton import HAVE_TRITON, lazy_jit, tl, triton

_OUT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

if HAVE_TRITON:

    @triton.jit
    def _e2m1_value(code):
        """E2M1 nibble → float32 from its bits (the _E2M1 table's values, signed zero included): magnitude index m
        = code & 7 is 0, 0.5 (m = 1) or (1 + (m & 1)/2) · 2^((m >> 1) − 1); a gather from a table costs more."""
        m = code & 7
        mag = tl.where(m == 1, 126 << 23, ((126 + (m >> 1)) << 23) | ((m & 1) << 22))
        mag = tl.where(m == 0, 0, mag)
        return (((code >> 3) << 31) | mag).to(tl.float32, bitcast=True)

    @lazy_jit
    def _ct_fp4_kernel(
        packed_ptr, scale_ptr, gs_ptr, out_ptr,
        n_rows, n_cols, n_blocks_row,
        E8M0: tl.constexpr, HAS_GS: tl.constexpr, BS: tl.constexpr, BLOCK_R: tl.constexpr, NB: tl.constexpr,
    ):  # fmt: skip
        # The tile is [BLOCK_R, NB, BS]: rows, scale blocks, elements of a block; each block's scale is decoded
        # (and for NVFP4 divided by the global scale) once, not once per element.
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None]
        nb = tl.program_id(1) * NB + tl.arange(0, NB)[None, :, None]
        c = nb * BS + tl.arange(0, BS)[None, None, :]
        rm = r < n_rows
        mask = rm & (c < n_cols)
        r64 = r.to(tl.int64)
        byte = tl.load(packed_ptr + r64 * (n_cols // 2) + c // 2, mask=mask, other=0).to(tl.int32)
        v = _e2m1_value((byte >> ((c % 2) * 4)) & 0xF)  # even element in the low nibble
        sb = tl.load(scale_ptr + r64 * n_blocks_row + nb, mask=rm & (nb < n_blocks_row), other=0).to(tl.int32)
        if E8M0:
            eff = tl.where(sb == 0, 0x00400000, sb << 23).to(tl.float32, bitcast=True)
        else:  # float8_e4m3fn bits
            e = (sb >> 3) & 0xF
            m = sb & 7
            normal = ((sb >> 7) << 31) | ((e + 120) << 23) | (m << 20)
            normal = tl.where((sb & 0x7F) == 0x7F, 0x7FC00000, normal).to(tl.float32, bitcast=True)  # NaN
            sub = m.to(tl.float32) * 0.001953125  # m · 2^-9, exact
            # sign by its bit: compiled, negating +0.0 can give +0.0 (0x80 is −0.0)
            sub = (sub.to(tl.uint32, bitcast=True) | ((sb >> 7) << 31).to(tl.uint32)).to(tl.float32, bitcast=True)
            eff = tl.where(e == 0, sub, normal)
            if HAS_GS:
                eff = tl.math.div_rn(eff, tl.load(gs_ptr).to(tl.float32))
        w = v * eff
        wb = w.to(tl.uint32, bitcast=True)  # → bfloat16, round to nearest even on the bits; NaN kept
        w = tl.where(w != w, w, ((wb + 0x7FFF + ((wb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True))
        tl.store(out_ptr + r64 * n_cols + c, w, mask=mask)

    @lazy_jit
    def _gptoss_kernel(
        blocks_ptr, scales_ptr, out_ptr, n_blocks, OUT: tl.constexpr, BLOCK_B: tl.constexpr
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
        j = tl.arange(0, 32)[None, :]
        bm = b < n_blocks
        byte = tl.load(blocks_ptr + b * 16 + j // 2, mask=bm, other=0).to(tl.int32)
        v = _e2m1_value((byte >> ((j % 2) * 4)) & 0xF)
        e = tl.load(scales_ptr + b, mask=bm, other=0).to(tl.int32)
        w = v * tl.where(e == 0, 0x00400000, e << 23).to(tl.float32, bitcast=True)
        if OUT == "bf16":
            wb = w.to(tl.uint32, bitcast=True)
            w = tl.where(w != w, w, ((wb + 0x7FFF + ((wb >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True))
        elif OUT == "fp16":
            w = w.to(tl.float16).to(tl.float32)
        tl.store(out_ptr + b * 32 + j, w, mask=bm)


def ct_fp4_triton(
    packed: torch.Tensor,
    scale: torch.Tensor,
    shape: tuple[int, int],
    global_scale: torch.Tensor | None = None,
    block: int = 32,
    block_r: int = 2,
    block_c: int = 1024,
) -> torch.Tensor:
    """Triton kernel, same contract as ``qconv.kernels.mx.ct_fp4_reference`` (CUDA, or CPU under
    TRITON_INTERPRET=1); ``block_r``/``block_c`` (powers of two) set the output tile."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install 'qconv[gpu]')")
    out_f, in_f = shape
    if in_f % block or in_f % 2:
        raise ValueError(f"ct-fp4: {in_f} input columns are not a multiple of the block {block}")
    out = torch.empty(out_f, in_f, dtype=torch.float32, device=packed.device)
    if out.numel() == 0:
        return out
    e8m0 = scale.dtype == torch.uint8
    if not e8m0 and scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"ct-fp4: scale dtype {scale.dtype} is neither uint8 (E8M0) nor float8_e4m3fn")
    sbytes = scale.contiguous().view(torch.uint8)
    has_gs = global_scale is not None and not e8m0
    gs = global_scale.float().reshape(-1).contiguous() if has_gs else sbytes
    nb = max(1, block_c // block)  # scale blocks per tile (block and block_c are powers of two)
    grid = (triton.cdiv(out_f, block_r), triton.cdiv(in_f // block, nb))
    _ct_fp4_kernel[grid](
        packed.contiguous(), sbytes, gs, out,
        out_f, in_f, sbytes.shape[-1],
        E8M0=e8m0, HAS_GS=has_gs, BS=block, BLOCK_R=block_r, NB=nb, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def gptoss_triton(
    blocks: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, block_b: int = 64
) -> torch.Tensor:
    """Triton kernel, same contract as ``qconv.kernels.mx.gptoss_reference`` (CUDA, or CPU under
    TRITON_INTERPRET=1); ``block_b`` (a power of two) is the 32-value blocks per program."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install 'qconv[gpu]')")
    if out_dtype not in _OUT:
        raise ValueError(f"gpt-oss mxfp4: output dtype {out_dtype} is not bfloat16, float16 or float32")
    if blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"gpt-oss mxfp4: blocks {list(blocks.shape)} do not match scales {list(scales.shape)}")
    out = torch.empty(*blocks.shape[:-2], blocks.shape[-2] * 32, dtype=torch.float32, device=blocks.device)
    n_blocks = math.prod(scales.shape)
    if n_blocks == 0:
        return out
    _gptoss_kernel[(triton.cdiv(n_blocks, block_b),)](
        blocks.contiguous(), scales.contiguous(), out, n_blocks,
        OUT=_OUT[out_dtype], BLOCK_B=block_b, enable_fp_fusion=False,
    )  # fmt: skip
    return out

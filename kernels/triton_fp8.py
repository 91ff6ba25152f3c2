"""Triton dequantization of FP8 weights with per-tensor, per-channel or 2-D block scales, beside the torch
reference in ``qconv.kernels.fp8`` and with its keyword signature:

  weight float8_e4m3fn (or float8_e5m2) [out, in], scale float [1] | [out, 1] | [ceil(out/bh), ceil(in/bw)],
  block_size (bh, bw) | None  →  float32 [out, in] = float(weight) · scale[o // bh, i // bw].

Each program fills a [BLOCK_R, BLOCK_C] tile. The FP8 byte is widened from its bits (exact): E4M3FN by sign,
4-bit exponent (bias 7, subnormals m·2^−9) and 3-bit mantissa, 0x7F/0xFF NaN; E5M2 is the top byte of a float16.
Then one float32 multiplication, as in the reference.
"""

from __future__ import annotations

import torch

from qconv.kernels._triton import HAVE_TRITON, lazy_jit, tl, triton

_FP8 = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
SCALAR, ROW, BLOCK = 0, 1, 2

if HAVE_TRITON:

    @lazy_jit
    def _fp8_dequant_kernel(
        w_ptr, scale_ptr, out_ptr,
        n_rows, n_cols, bh, bw, n_scale_cols,
        FMT: tl.constexpr, MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rm = r < n_rows
        mask = rm[:, None] & (c < n_cols)[None, :]
        r64 = r.to(tl.int64)[:, None]
        b = tl.load(w_ptr + r64 * n_cols + c[None, :], mask=mask, other=0).to(tl.int32)
        if FMT == "e4m3":
            e = (b >> 3) & 0xF
            m = b & 7
            normal = ((b >> 7) << 31) | ((e + 120) << 23) | (m << 20)
            normal = tl.where((b & 0x7F) == 0x7F, 0x7FC00000, normal).to(tl.float32, bitcast=True)  # NaN
            sub = m.to(tl.float32) * 0.001953125  # m · 2^-9, exact
            # the sign goes on by its bit: compiled, a negation of +0.0 can come out +0.0 (0x80 is −0.0)
            sub = (sub.to(tl.uint32, bitcast=True) | ((b >> 7) << 31).to(tl.uint32)).to(tl.float32, bitcast=True)
            w = tl.where(e == 0, sub, normal)
        else:  # e5m2: the high byte of a float16
            w = (b << 8).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        if MODE == 0:
            s = tl.load(scale_ptr).to(tl.float32)
        elif MODE == 1:
            s = tl.load(scale_ptr + r64, mask=rm[:, None], other=0.0).to(tl.float32)
        else:
            s = tl.load(scale_ptr + (r64 // bh) * n_scale_cols + (c // bw)[None, :], mask=mask, other=0.0)
            s = s.to(tl.float32)
        tl.store(out_ptr + r64 * n_cols + c[None, :], w * s, mask=mask)


def dequant_triton(
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int] | None = None,
    block_r: int = 32,
    block_c: int = 128,
) -> torch.Tensor:
    """Triton kernel, same contract as ``qconv.kernels.fp8.dequant_reference`` (CUDA, or CPU under
    TRITON_INTERPRET=1); ``block_r``/``block_c`` (powers of two) set the output tile."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install 'qconv[gpu]')")
    if weight.dtype not in _FP8 or weight.dim() != 2:
        raise ValueError(f"fp8: expected a float8_e4m3fn/float8_e5m2 [out, in] weight, got {weight.dtype}")
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=torch.float32, device=weight.device)
    if out.numel() == 0:
        return out
    scale = scale.contiguous()
    if scale.numel() == 1:
        mode, bh, bw, scols = SCALAR, 1, 1, 1
    elif block_size is None:
        if scale.numel() != rows:
            raise ValueError(f"fp8: per-channel scale of {scale.numel()} values for {rows} rows")
        mode, bh, bw, scols = ROW, 1, 1, 1
    else:
        mode, (bh, bw), scols = BLOCK, block_size, scale.shape[-1]
        if scale.dim() != 2 or scale.shape[0] != -(-rows // bh) or scols != -(-cols // bw):
            raise ValueError(f"fp8: block scale {list(scale.shape)} does not tile [{rows}, {cols}] by {bh}x{bw}")
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _fp8_dequant_kernel[grid](
        weight.contiguous().view(torch.uint8), scale, out,
        rows, cols, bh, bw, scols,
        FMT=_FP8[weight.dtype], MODE=mode, BLOCK_R=block_r, BLOCK_C=block_c, enable_fp_fusion=False,
    )  # fmt: skip
    return out

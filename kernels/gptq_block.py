"""GPTQ's column loop for one lazy batch as a single Triton kernel (qconv.quant.gptq.gptq_block_reference is the
torch version with the same semantics).

Rows are independent given the inverse Hessian factor U, so each program owns BLOCK_R rows of the batch's B
columns and walks the columns in order: quantize column i onto its (scale, zero), divide the rounding error by
U[i, i], subtract err ⊗ U[i, i:] from the row tile it keeps in registers. In torch the same loop is ~15 small
kernels per column; one 8B-model layer has ~27k columns, so launch overhead dominated GPTQ on a GPU.

Every operation is one float32 rounding in the reference's order (IEEE division, no FMA contraction: the launch
disables it), so codes and errors equal the torch loop's bit for bit (tested under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from qconv.kernels._triton import HAVE_TRITON, lazy_jit, tl, triton

BLOCK_R = 16


def available() -> bool:
    return HAVE_TRITON


if HAVE_TRITON:

    @lazy_jit
    def _gptq_block_kernel(
        w_ptr, u_ptr, s_ptr, z_ptr, q_ptr, e_ptr, R, width, qmax,
        stride_w, stride_u, stride_s, stride_z, stride_q, stride_e,
        BLOCK_R: tl.constexpr, B: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, B)
        r_ok = rows < R
        c_ok = cols < width
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        for i in range(0, width):
            x = tl.sum(tl.where((cols == i)[None, :], w, 0.0), axis=1)
            s = tl.load(s_ptr + rows * stride_s + i, mask=r_ok, other=1.0)
            z = tl.load(z_ptr + rows * stride_z + i, mask=r_ok, other=0.0)
            # round half to even by the 1.5·2²³ trick (exact in float32; the interpreter lacks libdevice.rint);
            # values past 2²² are clamped below anyway
            q = (tl.math.div_rn(x, s) + 12582912.0) - 12582912.0 + z
            q = tl.minimum(tl.maximum(q, 0.0), qmax)
            d = tl.load(u_ptr + i * stride_u + i)
            err = tl.math.div_rn(x - (q - z) * s, d)
            u = tl.load(u_ptr + i * stride_u + cols, mask=(cols >= i) & c_ok, other=0.0)
            w = w - err[:, None] * u[None, :]
            tl.store(q_ptr + rows * stride_q + i, q.to(tl.uint8), mask=r_ok)
            tl.store(e_ptr + rows * stride_e + i, err, mask=r_ok)


def gptq_block(
    w1: torch.Tensor, u1: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as qconv.quant.gptq.gptq_block_reference: w1 float32 [R, B] (any row stride, unit column
    stride), u1 float32 [B, B], s/z float32 [R, B] → codes uint8 [R, B], errors float32 [R, B]."""
    r, width = w1.shape
    if w1.stride(1) != 1:
        w1 = w1.contiguous()
    u1, s, z = u1.contiguous(), s.contiguous(), z.contiguous()
    codes = torch.empty(r, width, dtype=torch.uint8, device=w1.device)
    errs = torch.empty(r, width, dtype=torch.float32, device=w1.device)
    b = max(16, triton.next_power_of_2(width))
    _gptq_block_kernel[(triton.cdiv(r, BLOCK_R),)](
        w1, u1, s, z, codes, errs, r, width, float(qmax),
        w1.stride(0), u1.stride(0), s.stride(0), z.stride(0), codes.stride(0), errs.stride(0),
        BLOCK_R=BLOCK_R, B=b, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return codes, errs

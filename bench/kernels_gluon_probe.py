"""Probe for issue #6's large-batch target: W4A16 in Gluon with asynchronous wgmma (H100; not yet a qconv path).

    python bench/kernels_gluon_probe.py [--out DIR] [--shapes K,N;...] [--ms 128,512]

Why: in Triton 3.6 every ``tl.dot`` whose first operand is computed in registers compiles to ``wgmma.wait_group 0``,
so kernels/w4a16.py dequantizes and multiplies in turn and reaches 0.56–0.64× bf16 at M=512. Gluon (triton 3.6's
``triton.experimental.gluon``) exposes the wgmma wait count: here each of the 8 products of a 128-column K step is
issued asynchronously and the next weight plane is dequantized while it runs (``warpgroup_mma_wait(1)``). Otherwise
it is the same algorithm as kernels/w4a16.py (W4Layout, yᵀ tiles, the weights as the register operand, one LOP3 per
pair of codes, weights scaled in bf16 before the MMA as loaders do) with x staged through a 3-deep cp.async ring and
the next step's weights and scales loaded a step ahead.

Scope of the probe: symmetric codes, bf16 activations and scales, group 128, and N, M, K multiples of the tile
sizes and of 128 (the bench's shapes). Each output is checked against F.linear on the dequantized weights before
timing (same checks and CUDA-graph timing as bench/kernels_matmul.py). Results: BENCHMARKS.md, kernels (#6).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_matmul import ROTATE_BYTES, graph_time, machine, rel_err  # noqa: E402

CONFIGS = [(128, 256, 8), (128, 128, 8), (64, 128, 4)]  # (BN weight rows, BM batch rows, warps)


@gluon.jit
def _w4_gluon_kernel(x_ptr, qw_ptr, s_ptr, y_ptr, M, N, K, KB,
                     ASM0: gl.constexpr, ASM1: gl.constexpr, ASM2: gl.constexpr, ASM3: gl.constexpr,
                     BN: gl.constexpr, BM: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    pid = gl.program_id(0)
    num_m = gl.cdiv(M, BM)
    pid_m = pid % num_m
    pid_n = pid // num_m
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BM, 16])  # fmt: skip
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    # x: 3 stages × two 64-column halves of a 128-column step, 128-byte swizzle (the wgmma's B, K-major)
    x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, 64], gl.bfloat16)
    xs = gl.allocate_shared_memory(gl.bfloat16, [6, BM, 64], x_sl)
    x_l: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    xm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, x_l))
    xk = gl.arange(0, 64, layout=gl.SliceLayout(0, x_l))
    x_base = x_ptr + xm[:, None] * K + xk[None, :]
    # weights: halfwords 16t…16t+15 of each block row (super-tile t), loaded straight into the operand layout, so
    # nibble p of them is the operand for columns 64t + 16p … + 15
    rows = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, a_l))
    cols = gl.arange(0, 16, layout=gl.SliceLayout(0, a_l))
    w_base = qw_ptr + ((rows // 64) * (KB * 2048) + (rows % 64) * 32)[:, None] + cols[None, :]
    s_base = s_ptr + rows
    acc = gl.zeros((BN, BM), gl.float32, layout=mma)
    a_prev = gl.zeros((BN, 16), gl.bfloat16, layout=a_l)
    n_steps = K // 128
    for j in gl.static_range(2):  # steps 0 and 1 in flight
        async_copy.async_copy_global_to_shared(xs.index(2 * j), x_base + j * 128)
        async_copy.async_copy_global_to_shared(xs.index(2 * j + 1), x_base + j * 128 + 64)
        async_copy.commit_group()
    w0n = gl.load(w_base)
    w1n = gl.load(w_base + 16)
    scn = gl.load(s_base)
    for i in range(n_steps):
        s = i % 3
        w0 = w0n
        w1 = w1n
        sc = scn
        ni = gl.minimum(i + 1, n_steps - 1)
        w0n = gl.load(w_base + ni * 2048)
        w1n = gl.load(w_base + ni * 2048 + 16)
        scn = gl.load(s_base + ni * N)
        async_copy.wait_group(1)  # step i's x has landed (step i + 1's may still fly)
        gl.thread_barrier()
        fence_async_shared()
        for t in gl.static_range(2):
            if t == 0:
                wt = w0
            else:
                wt = w1
            xt = xs.index(2 * s + t)
            for p in gl.static_range(4):
                if p == 0:
                    a = gl.inline_asm_elementwise(ASM0, "=r,r", [wt], gl.bfloat16, True, 2)
                elif p == 1:
                    a = gl.inline_asm_elementwise(ASM1, "=r,r", [wt], gl.bfloat16, True, 2)
                elif p == 2:
                    a = gl.inline_asm_elementwise(ASM2, "=r,r", [wt], gl.bfloat16, True, 2)
                else:
                    a = gl.inline_asm_elementwise(ASM3, "=r,r", [wt], gl.bfloat16, True, 2)
                a = (a - 136.0) * sc[:, None]  # (128 + code) − (128 + 8), then the scale: one bf16 rounding
                b = xt.slice(16 * p, 16, dim=1).permute((1, 0))
                acc = warpgroup_mma(a, b, acc, is_async=True)
                # the previous product is done: its operand registers (a_prev) may be reused from here on
                acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
                a_prev = a
                if t == 0 and p == 0:
                    # step i - 1's products are all complete: its stage takes step i + 2's x
                    n2 = gl.minimum(i + 2, n_steps - 1) * 128
                    s2 = (i + 2) % 3
                    async_copy.async_copy_global_to_shared(xs.index(2 * s2), x_base + n2)
                    async_copy.async_copy_global_to_shared(xs.index(2 * s2 + 1), x_base + n2 + 64)
                    async_copy.commit_group()
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    async_copy.wait_group(0)
    out_l: gl.constexpr = gl.BlockedLayout([8, 1], [32, 1], [1, num_warps], [0, 1])
    y = gl.convert_layout(acc.to(gl.bfloat16), out_l)
    yn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, out_l))
    ym = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(0, out_l))
    gl.store(y_ptr + ym[None, :] * N + yn[:, None], y)


def asm_constants() -> dict:
    from qconv.kernels.w4a16 import MAGIC, asm_codes

    a0, a1, a2, a3, _ = asm_codes(MAGIC[torch.bfloat16][0])
    return dict(ASM0=a0, ASM1=a1, ASM2=a2, ASM3=a3)


def gluon_matmul(x: torch.Tensor, lay, bn: int, bm: int, warps: int) -> torch.Tensor:
    """x [M, K] bf16 @ dequant(lay)ᵀ for the probe's scope (see the module docstring)."""
    m, k = x.shape
    n = lay.shape[0]
    if m % bm or n % bn or k % 128 or lay.zeros is not None or lay.group_size != 128 or lay.scales.dtype != x.dtype:
        raise ValueError("the probe covers symmetric group-128 bf16 weights on tile multiples only")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _w4_gluon_kernel[(n // bn * (m // bm),)](x, lay.qweight, lay.scales, y, m, n, k, lay.qweight.shape[1] // 32,
                                             BN=bn, BM=bm, num_warps=warps, **asm_constants())  # fmt: skip
    return y


def main() -> None:
    from kernels_sweep import layout

    from qconv.kernels import w4a16

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--shapes", default="8192,8192;4096,14336;28672,8192;4096,4096")
    ap.add_argument("--ms", default="128,512")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(machine(), flush=True)
    for shape in args.shapes.split(";"):
        k, n = (int(v) for v in shape.split(","))
        lay, _, _ = layout(n, k, gen)
        w_ref = w4a16.dequantize(lay)
        w_bf16 = w_ref.to(torch.bfloat16)
        copies = lambda nbytes: max(1, math.ceil(ROTATE_BYTES / nbytes))  # noqa: E731
        bf_ws = [w_bf16] + [w_bf16.clone() for _ in range(copies(2 * n * k) - 1)]
        q_ws = [lay] + [lay.to("cpu").to("cuda") for _ in range(copies(lay.nbytes()) - 1)]
        for m in (int(v) for v in args.ms.split(",")):
            x = (torch.randn(m, k, generator=gen) * 0.5).to(torch.bfloat16).cuda()
            ref = F.linear(x.float(), w_ref)
            row = {"K": k, "N": n, "M": m, "bf16_us": graph_time([lambda w=w, x=x: F.linear(x, w) for w in bf_ws])}
            for bn, bm, warps in CONFIGS:
                if bm > m:
                    continue
                label = f"n{bn}m{bm}w{warps}"
                err = rel_err(gluon_matmul(x, lay, bn, bm, warps), ref)
                if not err < 1e-2:
                    raise AssertionError(f"{label} on K={k} N={n} M={m}: relative error {err:.3g}")
                us = graph_time([lambda w=w, x=x, c=(bn, bm, warps): gluon_matmul(x, w, *c) for w in q_ws])
                row[label] = {"us": us, "err": err, "x_bf16": row["bf16_us"] / us}
            rows.append(row)
            best = min((v["us"], lab) for lab, v in row.items() if isinstance(v, dict))
            print(f"K={k} N={n} M={m}: bf16 {row['bf16_us']:.1f} µs, best {best[1]} {best[0]:.1f} µs "
                  f"({row['bf16_us'] / best[0]:.2f}× bf16)", flush=True)  # fmt: skip
        del bf_ws, q_ws
        torch.cuda.empty_cache()
    (out / "kernels_gluon_probe.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

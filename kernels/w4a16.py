"""Fused W4A16 matmul: y = x @ dequant(W)ᵀ for 4-bit integer group layouts, in one Triton kernel.

The kernel's layout (``W4Layout``), built once at load from an on-disk layout (the file itself is never changed):
  qweight  int32 [N, K/8]   the codes of w[n, 8j … 8j+7] in word j, nibble position p holding k = 8j + NIBBLE_ORDER[p]
                            (0, 2, 4, 6, 1, 3, 5, 7): the pair (k, k+1) lies at bits 4i and 16 + 4i, so one shift and
                            one mask make two 16-bit lanes (compressed-tensors stores k = 8j + p, LSB first)
  scales   fp16/bf16/fp32 [G, N]  transposed from the file's [N, G] so a K tile reads one contiguous row
  zeros    uint8 [G, N]     asymmetric zero points in code units (unpacked from the file's [N/8, G] int32); None
                            when symmetric (zero 8)
  perm     int64 [K] or None  act-order whose groups are contiguous once the columns are sorted: the columns of
                            qweight are stored in that order and x's columns are gathered the same way (this is what
                            production int4 kernels do with GPTQ act-order checkpoints)
  g_idx    int32 [K] or None  any other column → group map (general path: scale and zero gathered per element)
  w[n, k] = (code − zero[g, n]) · scale[g, n],  g = k // group_size (or g_idx[k]).

The tensor-core kernel computes yᵀ tiles: acc[BLOCK_N, BLOCK_M] += W'[BLOCK_N, BLOCK_K] · xᵀ[BLOCK_K, BLOCK_M], the
unpacked weights being the MMA's first operand (so a batch of 2–16 rows sits in the MMA's narrow N slot). A K tile
lies in one group (group_size % BLOCK_K == 0). Codes become 16-bit floats without a conversion instruction:
``code | 0x4300`` read as bfloat16 is 128 + code (``code | 0x6400`` as float16 is 1024 + code); subtracting 128 + zero
in 16-bit arithmetic is exact (small integers). Small batches scale each K tile's exact float32 partial product by
its group's scale; large batches (``Config.scale_w``) multiply the weights by their scale in 16 bits first (one
rounding, as loaders and the dequantize path do) so the MMA accumulates in place. One row runs a CUDA-core GEMV
instead (float32 dequantization by the same exponent trick, no MMA). Split-K: partial tiles meet in a float32
workspace and the last program of each output tile (an acq_rel counter it resets) adds them in a fixed order — one
launch, deterministic; fp32 atomics on a zeroed workspace remain as an option. For large batches a dequantizing
kernel writing 16-bit weights followed by torch's matmul competes too. Launch shapes are chosen per (M bucket, N, K,
group, layout) by timing the short list of ``candidates()`` (what won bench/kernels_sweep.py on the H100) on the
first call (``Tuner``); under TRITON_INTERPRET=1 the first candidate runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from qconv.formats.bitpack import pack_rows, unpack_rows
from qconv.kernels._triton import HAVE_TRITON, interpret_mode, lazy_jit, tl, triton

# 16-bit float bit patterns: OR-ing a 4-bit code into the mantissa gives MAGIC_VALUE + code exactly.
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
SMALL_M = 16  # batches up to this many rows take the split-K schedule
NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # k offset held at nibble position p of a qweight word
_POSITION_OF = tuple(NIBBLE_ORDER.index(j) for j in range(8))  # nibble position of k offset j


@dataclass(frozen=True)
class W4Layout:
    """The packed weight of one linear in the kernel's layout (see the module docstring); shape = (N, K)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    shape: tuple[int, int]
    perm: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    def to(self, device) -> W4Layout:
        mv = lambda t: None if t is None else t.to(device)
        return replace(self, qweight=mv(self.qweight), scales=mv(self.scales), zeros=mv(self.zeros),
                       perm=mv(self.perm), g_idx=mv(self.g_idx))  # fmt: skip

    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight: codes, scales, zero points (g_idx/perm excluded: per call O(K))."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


# ---------------------------------------------------------------------------------------------------------------
# Converters from on-disk layouts


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (K % 8 == 0) → the kernel's interleaved qweight int32 [N, K/8]."""
    n, k = codes.shape
    return pack_rows(codes.reshape(n, k // 8, 8)[:, :, list(NIBBLE_ORDER)].reshape(n, k), 4).contiguous()


def unpack_codes(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_codes: int32 [N, K/8] → uint8 codes [N, K]."""
    n = qweight.shape[0]
    return unpack_rows(qweight, 4, k).reshape(n, k // 8, 8)[:, :, list(_POSITION_OF)].reshape(n, k)


def from_codes(
    codes: torch.Tensor,
    scales_ng: torch.Tensor,
    zeros_ng: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> W4Layout:
    """Unpacked parts → W4Layout. codes uint8 [N, K] (columns in the weight's order), scales [N, G] (any float
    dtype), zeros [N, G] integer zero points in code units or None (symmetric: 8), g_idx [K] or None."""
    n, k = codes.shape
    if k % 8:
        raise ValueError(f"the W4A16 kernel needs K divisible by 8 (K = {k})")
    gs = k if group_size in (-1, None) else group_size
    zeros = None if zeros_ng is None else zeros_ng.T.to(torch.uint8).contiguous()
    scales = scales_ng.T.contiguous()
    static = torch.arange(k, device=codes.device) // gs
    if g_idx is None and not _static_ok(gs, k):
        g_idx = static  # the static path finds a tile's group by a shift: other group sizes take the per-column map
    if g_idx is not None:
        g = g_idx.to(torch.int64).to(codes.device)
        if not (_static_ok(gs, k) and torch.equal(g, static)):
            perm = torch.argsort(g, stable=True)
            if _static_ok(gs, k) and torch.equal(g[perm], static):
                return W4Layout(pack_codes(codes[:, perm]), scales, zeros, gs, (n, k), perm=perm)
            return W4Layout(pack_codes(codes), scales, zeros, gs, (n, k), g_idx=g.to(torch.int32).contiguous())
    return W4Layout(pack_codes(codes), scales, zeros, gs, (n, k))


def from_ct(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_packed: torch.Tensor | None,
    shape: tuple[int, int],
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
) -> W4Layout:
    """compressed-tensors pack-quantized int4 (the keywords of ``kernels.ct_int.dequant_reference``) → W4Layout.

    packed int32 [N, K/8], scale [N, G], zero_packed int32 [N/8, G] (asymmetric) or None, g_idx int32 [K] or None.
    """
    if bits != 4:
        raise ValueError(f"the W4A16 kernel takes 4-bit weights, not {bits}-bit")
    n, k = shape
    zeros = None if zero_packed is None else unpack_rows(zero_packed.T.contiguous(), 4, n).T
    return from_codes(unpack_rows(packed, 4, k), scale, zeros, group_size, g_idx)


def _static_ok(group_size: int, k: int) -> bool:
    """Whether contiguous groups can run on the static path: a power-of-two group of ≥ 16 columns (K tiles stay
    inside one group), or one group spanning K with K divisible by 16."""
    if group_size >= k:
        return k % 16 == 0
    return group_size >= 16 and group_size & (group_size - 1) == 0


# ---------------------------------------------------------------------------------------------------------------
# Torch reference


def dequantize(w: W4Layout) -> torch.Tensor:
    """float32 [N, K] in the weight's original column order, computed from the kernel layout in plain torch."""
    n, k = w.shape
    codes = unpack_codes(w.qweight, k).float()
    if w.perm is not None:
        group = torch.arange(k, device=codes.device) // w.group_size
    elif w.g_idx is not None:
        group = w.g_idx.long()
    else:
        group = torch.arange(k, device=codes.device) // w.group_size
    zero = w.zeros.T.float()[:, group] if w.zeros is not None else 8.0
    out = (codes - zero) * w.scales.T.float()[:, group]
    if w.perm is not None:
        restored = torch.empty_like(out)
        restored[:, w.perm] = out
        out = restored
    return out


def reference_matmul(x: torch.Tensor, w: W4Layout, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] → [..., N] in x's dtype: the dequantized float32 weight, one float32 matmul, one rounding."""
    y = x.float() @ dequantize(w).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel

if HAVE_TRITON:

    @lazy_jit
    def _w4a16_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, gidx_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, GS_SHIFT, stride_xm, stride_ym, stride_wn, k_per_split, n_split,
        HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, REDUCE: tl.constexpr,
        SCALE_W: tl.constexpr, S16: tl.constexpr, EVEN_K: tl.constexpr, MAGIC_BITS: tl.constexpr,
        MAGIC_VALUE: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        # consecutive programs share a weight tile (its re-reads for other row blocks hit L2)
        pid_m = pid % num_m
        pid_n = pid // num_m
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        m_mask = offs_m < M
        offs_kk = tl.arange(0, BLOCK_K)
        offs_kw = tl.arange(0, BLOCK_K // 8)
        xdt = x_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        w_ptrs = qw_ptr + offs_n[:, None] * stride_wn + offs_kw[None, :]
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_kk[:, None]
        # the static path's scale / zero row of the next K tile is loaded one iteration ahead (registers): the
        # pipeliner stages only the dot operands, and a load issued just before its use would stall every tile
        s_next = tl.load(s_ptr + (k_lo >> GS_SHIFT) * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z_next = tl.load(z_ptr + (k_lo >> GS_SHIFT) * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        else:
            z_next = tl.full((BLOCK_N,), 8.0, tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                words = tl.load(w_ptrs + k0 // 8, mask=n_mask[:, None], other=0)
                xt = tl.load(x_ptrs + k0, mask=m_mask[None, :], other=0.0)
            else:
                kw_ok = (k0 // 8 + offs_kw) < K // 8
                k_ok = (k0 + offs_kk) < K
                words = tl.load(w_ptrs + k0 // 8, mask=n_mask[:, None] & kw_ok[None, :], other=0)
                xt = tl.load(x_ptrs + k0, mask=m_mask[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:  # interpreter only: it keeps bfloat16 as raw uint16 bits and would multiply those
                xt = xt.to(tl.float32)
            # [BLOCK_N, BLOCK_K/8] words → [BLOCK_N, BLOCK_K] int32 holding MAGIC_BITS | code, k = 8·word + j.
            # With the interleaved order one shift and one mask give two 16-bit lanes at once (pair i = k offsets
            # 2i, 2i + 1 at bits 4i and 16 + 4i); the compiler keeps them in one register when the halves are taken
            # as (pair & 0xFFFF, pair >> 16). Built by joins (each adds an in-thread dimension of 2) so a thread
            # keeps the codes of its word: a broadcast shift against arange(8) would spread one word over 8
            # threads, each reloading it. join(a, b) puts a at 0 and b at 1 of a new last dimension: the outermost
            # join picks j's lowest bit, the innermost its highest ([..., j0, j1, j2] flattens to 4·j0 + 2·j1 + j2).
            magic2 = MAGIC_BITS * 0x10001
            p0 = (words & 0xF000F) | magic2
            p1 = ((words >> 4) & 0xF000F) | magic2
            p2 = ((words >> 8) & 0xF000F) | magic2
            p3 = ((words >> 12) & 0xF000F) | magic2
            even = tl.join(tl.join(p0 & 0xFFFF, p2 & 0xFFFF), tl.join(p1 & 0xFFFF, p3 & 0xFFFF))
            odd = tl.join(tl.join(p0 >> 16, p2 >> 16), tl.join(p1 >> 16, p3 >> 16))
            codes = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K))
            wq = codes.to(tl.int16).to(xdt, bitcast=True)  # MAGIC_VALUE + code, exactly
            if HAS_GIDX:
                ks = k0 + offs_kk
                g = tl.load(gidx_ptr + ks, mask=ks < K, other=0)
                sz_off = g[None, :] * N + offs_n[:, None]
                s = tl.load(s_ptr + sz_off, mask=n_mask[:, None], other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptr + sz_off, mask=n_mask[:, None], other=0).to(tl.float32)
                else:
                    z = 8.0
                w = ((wq.to(tl.float32) - (z + MAGIC_VALUE)) * s).to(xdt).to(xt.dtype)
                acc += tl.dot(w, xt)
            else:
                s = s_next
                z = z_next
                g = tl.minimum(k0 + BLOCK_K, K - 1) >> GS_SHIFT
                s_next = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                if HAS_ZERO:
                    z_next = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)
                w = wq.to(xt.dtype) - (z + MAGIC_VALUE).to(xt.dtype)[:, None]  # code − zero: exact in 16 bits
                if SCALE_W:  # (code − zero)·scale rounded once to 16 bits, as loaders do; the MMA accumulates
                    if S16:  # scales stored in x's dtype: one 16-bit multiply rounds the exact product
                        w = w * s.to(xdt)[:, None]
                    else:
                        w = (w.to(tl.float32) * s[:, None]).to(xdt).to(xt.dtype)
                    acc = tl.dot(w, xt, acc)
                else:  # exact weights: the group's scale multiplies the tile's float32 partial product
                    acc += tl.dot(w, xt) * s[:, None]
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
        if REDUCE == 0:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        elif REDUCE == 1:  # partial tiles added into a zeroed float32 workspace (y_ptr), cast by the caller
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            # partial tiles meet in a float32 workspace [n_split, M, N]; the last program of an output tile (an
            # acq_rel counter, which it resets for the next launch) adds them in split order and writes y
            ws_off = offs_m[None, :] * N + offs_n[:, None]
            tl.store(ws_ptr + pid_k * M * N + ws_off, acc, mask=mask)
            done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if done == n_split - 1:
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                for sk in range(n_split):
                    total += tl.load(ws_ptr + sk * M * N + ws_off, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid, 0)

    @lazy_jit
    def _w4a16_gemv_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, GS_SHIFT, stride_xm, stride_ym, stride_wn, k_per_split, n_split,
        HAS_ZERO: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """CUDA-core GEMV for one row (static groups only): y[0, n] = Σ_k x[0, k]·(code − zero)·scale.

        A K tile lies in one group. Each thread dequantizes whole words in float32 without a conversion
        instruction: nibble i of a 16-bit half, masked in place and OR-ed with the exponent of 2^(23 − 4i), reads as
        2^(23 − 4i) + code, and one subtraction of 2^(23 − 4i) + zero gives code − zero exactly. The eight products
        of a word are summed in the thread (an FMA chain), scaled once per word by its group's scale, and kept per
        word until the end, so threads exchange partial sums once, after the K loop. SPLIT: K is split over
        programs, partial rows meet in a float32 workspace, and the last program of a column tile (an acq_rel
        counter, reset by it) adds them in split order and writes y — one launch, deterministic.
        """
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask = offs_n < N
        m_mask = offs_m < M
        offs_kw = tl.arange(0, BLOCK_K // 8)
        acc = tl.zeros((BLOCK_N, BLOCK_K // 8), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        w_ptrs = qw_ptr + offs_n[:, None] * stride_wn + offs_kw[None, :]
        x_ptrs = x_ptr + offs_kw * 8
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                words = tl.load(w_ptrs + k0 // 8, mask=n_mask[:, None], other=0)
                kw_ok = offs_kw < BLOCK_K // 8
            else:
                kw_ok = (k0 // 8 + offs_kw) < K // 8
                words = tl.load(w_ptrs + k0 // 8, mask=n_mask[:, None] & kw_ok[None, :], other=0)
            # x at k = 8·word + j, one [BLOCK_K/8] vector per j (broadcast over the tile's rows)
            xp = x_ptrs + k0
            x0 = tl.load(xp, mask=kw_ok, other=0.0).to(tl.float32)[None, :]
            x1 = tl.load(xp + 1, mask=kw_ok, other=0.0).to(tl.float32)[None, :]
            x2 = tl.load(xp + 2, mask=kw_ok, other=0.0).to(tl.float32)[None, :]
            x3 = tl.load(xp + 3, mask=kw_ok, other=0.0).to(tl.float32)[None, :]
            x4 = tl.load(xp + 4, mask=kw_ok, other=0.0).to(tl.float32)[None, :]
            x5 = tl.load(xp + 5, mask=kw_ok, other=0.0).to(tl.float32)[None, :]
            x6 = tl.load(xp + 6, mask=kw_ok, other=0.0).to(tl.float32)[None, :]
            x7 = tl.load(xp + 7, mask=kw_ok, other=0.0).to(tl.float32)[None, :]
            g = k0 >> GS_SHIFT
            s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0).to(tl.float32)[:, None]
            else:
                z = 8.0
            hi = words >> 16
            # k = 2i: nibble i of the low half; k = 2i + 1: nibble i of the high half (the interleaved order)
            part = (((words & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)) * x0
            part += (((hi & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + z)) * x1
            part += (((words & 0xF0) | 0x49000000).to(tl.float32, bitcast=True) - (524288.0 + z)) * x2
            part += (((hi & 0xF0) | 0x49000000).to(tl.float32, bitcast=True) - (524288.0 + z)) * x3
            part += (((words & 0xF00) | 0x47000000).to(tl.float32, bitcast=True) - (32768.0 + z)) * x4
            part += (((hi & 0xF00) | 0x47000000).to(tl.float32, bitcast=True) - (32768.0 + z)) * x5
            part += (((words & 0xF000) | 0x45000000).to(tl.float32, bitcast=True) - (2048.0 + z)) * x6
            part += (((hi & 0xF000) | 0x45000000).to(tl.float32, bitcast=True) - (2048.0 + z)) * x7
            acc += part * s
        out = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
        y_off = offs_m[:, None] * stride_ym + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if not SPLIT:
            tl.store(y_ptr + y_off, out.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            ws_off = offs_m[:, None] * N + offs_n[None, :]
            tl.store(ws_ptr + pid_k * M * N + ws_off, out, mask=mask)
            done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if done == n_split - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for sk in range(n_split):
                    total += tl.load(ws_ptr + sk * M * N + ws_off, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptr + y_off, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid_n, 0)

    @lazy_jit
    def _w4_dequant_kernel(
        qw_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr, N, K, GS_SHIFT, stride_wn,
        HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """W4Layout → 16-bit weights [N, K] in qweight's column order (out_ptr's dtype), for the large-batch path."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n_mask = offs_n < N
        kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        w_mask = n_mask[:, None] & (kw < K // 8)[None, :]
        words = tl.load(qw_ptr + offs_n[:, None] * stride_wn + kw[None, :], mask=w_mask, other=0)
        p0 = (words & 0xF000F) | 0x43004300  # as in _w4a16_kernel (bfloat16 offset 128)
        p1 = ((words >> 4) & 0xF000F) | 0x43004300
        p2 = ((words >> 8) & 0xF000F) | 0x43004300
        p3 = ((words >> 12) & 0xF000F) | 0x43004300
        even = tl.join(tl.join(p0 & 0xFFFF, p2 & 0xFFFF), tl.join(p1 & 0xFFFF, p3 & 0xFFFF))
        odd = tl.join(tl.join(p0 >> 16, p2 >> 16), tl.join(p1 >> 16, p3 >> 16))
        codes = tl.reshape(tl.join(even, odd), (BLOCK_N, BLOCK_K)).to(tl.int16).to(tl.bfloat16, bitcast=True)
        codes = codes.to(tl.float32) - 128.0
        mask = n_mask[:, None] & k_mask[None, :]
        if HAS_GIDX:
            g = tl.load(gidx_ptr + ks, mask=k_mask, other=0)[None, :]
        else:
            g = (ks >> GS_SHIFT)[None, :]
        s = tl.load(s_ptr + g * N + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + g * N + offs_n[:, None], mask=mask, other=0).to(tl.float32)
        else:
            z = 8.0
        w = (codes - z) * s
        tl.store(out_ptr + offs_n[:, None] * K + ks[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Config:
    """One launch shape: tiles, split-K factor, warps, pipeline stages, and kind:

    - "fused": the tensor-core W4A16 kernel. split_k > 1 splits K over programs whose partial tiles meet in a
      float32 workspace, added by the last program of each tile (one launch), or with ``atomic`` in fp32 atomics
      on a zeroed workspace cast afterwards (three launches). ``scale_w``: weights scaled and rounded to 16 bits
      before the MMA (as loaders do; one accumulator) instead of scaling each K tile's exact partial product.
    - "gemv": the CUDA-core kernel for one row (static groups only).
    - "dequant": 16-bit weights written by a dequantizing kernel, then torch's matmul (large batches).
    """

    block_n: int
    block_m: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    kind: str = "fused"
    scale_w: bool = False
    atomic: bool = False

    def label(self) -> str:
        if self.kind == "dequant":
            return "dequant+matmul"
        tag = "gemv-" if self.kind == "gemv" else ""
        extra = ("r" if self.scale_w else "") + ("a" if self.atomic else "")
        return (f"{tag}n{self.block_n}m{self.block_m}k{self.block_k}s{self.split_k}w{self.num_warps}"
                f"p{self.num_stages}{extra}")  # fmt: skip


def supported(x: torch.Tensor, w: W4Layout) -> str | None:
    """None when the Triton kernel can run x @ wᵀ here, else the reason it cannot."""
    if not HAVE_TRITON:
        return "triton is not installed"
    if not (x.is_cuda or interpret_mode()):
        return "the kernel runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)"
    if x.dtype not in MAGIC:
        return f"activations are {x.dtype}; the kernel takes float16 or bfloat16"
    return None


def _group_shift(w: W4Layout) -> int:
    """k >> shift = k's group: log2 of a power-of-two group size, or 31 for one group spanning K (< 2^31)."""
    if w.n_groups == 1:
        return 31
    return w.group_size.bit_length() - 1


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _split(tiles: int, k: int, bk: int, per_sm: int, sms: int, min_steps: int = 2) -> int:
    """Split-K factor giving about ``per_sm`` programs per multiprocessor, each keeping ≥ min_steps K tiles."""
    return max(1, min(round(per_sm * sms / tiles), triton.cdiv(k, bk) // min_steps))


def candidates(m: int, w: W4Layout, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[Config]:
    """Launch shapes worth timing for an [m, K] × [N, K]ᵀ product (the first is the untimed default).

    The short lists are what won bench/kernels_sweep.py on the H100 (BENCHMARKS.md, kernels (#6)): one row — the
    CUDA-core GEMV, split so the grid holds ~4–8 programs per multiprocessor; 2–16 rows — 64/128 × 16 tensor-core
    tiles, split likewise; up to 64 rows — 64 × 64 tiles with exact weights; larger batches — 128 × 128 (× 256 for
    ≥ 256 rows) tiles with 8 warps and weights rounded to 16 bits before the MMA, and dequantize + matmul.
    """
    n, k = w.shape
    sms = _sm_count(device)
    if w.g_idx is not None:
        bk = 32  # any size works on the per-column path (K is masked)
    else:
        bk = next(b for b in (64, 32, 16) if w.group_size % b == 0)
    out: list[Config] = []
    tiles = lambda bn, bm: triton.cdiv(m, bm) * triton.cdiv(n, bn)  # noqa: E731
    if m == 1 and w.g_idx is None:
        one_group = w.n_groups == 1
        gk = next((b for b in (128, 64, 32) if one_group or w.group_size % b == 0), None)
        if gk is not None:
            for bn, per_sm in ((64, 8), (128, 8), (64, 4)):
                out.append(Config(bn, 1, gk, _split(tiles(bn, 1), k, gk, per_sm, sms), 4, 1, kind="gemv"))
    if out:  # the GEMV won every one-row shape of the sweep
        return out
    if m <= SMALL_M:
        for bn, stages, per_sm in ((128, 3, 8), (64, 4, 4), (128, 3, 4), (64, 4, 8)):
            out.append(Config(bn, 16, bk, _split(tiles(bn, 16), k, bk, per_sm, sms, 8), 4, stages))
    elif m <= 64:
        for per_sm in (2, 4, 8):
            out.append(Config(64, 64, bk, _split(tiles(64, 64), k, bk, per_sm, sms), 4, 4))
    elif m <= 128:
        bk2 = 128 if w.g_idx is None and w.group_size % 128 == 0 else bk
        out.append(Config(128, 128, bk, 1, 8, 3, scale_w=True))
        out.append(Config(128, 128, bk2, _split(tiles(128, 128), k, bk2, 1, sms), 8, 3, scale_w=True))
    else:
        out.append(Config(128, 256, bk, 1, 8, 3, scale_w=True))
        out.append(Config(128, 128, bk, 1, 8, 3, scale_w=True))
        out.append(Config(64, 0, 128, kind="dequant"))
    return list(dict.fromkeys(out))


def dequantize_16(w: W4Layout, dtype: torch.dtype) -> torch.Tensor:
    """Triton: W4Layout → ``dtype`` weights [N, K] in qweight's column order (x must be gathered by w.perm)."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.qweight.device)
    bk = 32 if k % 64 else 64
    dummy = w.qweight
    _w4_dequant_kernel[(triton.cdiv(n, 64), triton.cdiv(k, bk))](
        w.qweight, w.scales, w.zeros if w.zeros is not None else dummy, w.g_idx if w.g_idx is not None else dummy,
        out, n, k, _group_shift(w), w.qweight.stride(0),
        HAS_ZERO=w.zeros is not None, HAS_GIDX=w.g_idx is not None, BLOCK_N=64, BLOCK_K=bk, num_warps=4,
    )  # fmt: skip
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros [≥ n] on ``device``, kept between calls: the split-K kernels count arrivals per output tile in
    them and the last arrival resets its counter, so they are zero again after every launch. Launches sharing the
    buffer must not run concurrently (one stream; a CUDA graph captures it like any tensor once allocated)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


LAST_KERNEL = None  # the compiled kernel of the latest launch (bench/kernels_sweep.py reads its registers, spills)


def launch(x2: torch.Tensor, w: W4Layout, cfg: Config) -> torch.Tensor:
    """One product for a contiguous [M, K] x (already column-permuted when w.perm is set) → [M, N]."""
    global LAST_KERNEL
    m, k = x2.shape
    n = w.shape[0]
    if cfg.kind == "dequant":
        return torch.nn.functional.linear(x2, dequantize_16(w, x2.dtype))
    k_steps = triton.cdiv(k, cfg.block_k)
    k_per_split = triton.cdiv(k_steps, cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    atomic = split > 1 and cfg.atomic
    if atomic:
        y = torch.zeros(m, n, dtype=torch.float32, device=x2.device)
    else:
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    dummy = w.qweight
    if cfg.kind == "gemv":
        if m != 1 or w.g_idx is not None:
            raise ValueError("the GEMV kernel takes one row and static groups")
        n_tiles = triton.cdiv(n, cfg.block_n)
        ws = torch.empty(split, m, n, dtype=torch.float32, device=x2.device) if split > 1 else y
        cnt = _counters(x2.device, n_tiles) if split > 1 else dummy
        LAST_KERNEL = _w4a16_gemv_kernel[(n_tiles, split)](
            x2, w.qweight, w.scales, w.zeros if w.zeros is not None else dummy, y, ws, cnt,
            m, n, k, _group_shift(w), x2.stride(0), y.stride(0), w.qweight.stride(0), k_per_split, split,
            HAS_ZERO=w.zeros is not None, SPLIT=split > 1, EVEN_K=k % cfg.block_k == 0,
            BLOCK_N=cfg.block_n, BLOCK_M=1, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return y
    magic_bits, magic_value = MAGIC[x2.dtype]
    upcast = interpret_mode() and x2.dtype == torch.bfloat16
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    serial = split > 1 and not atomic
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x2.device) if serial else y
    cnt = _counters(x2.device, tiles) if serial else dummy
    LAST_KERNEL = _w4a16_kernel[(tiles, split)](
        x2, w.qweight, w.scales, w.zeros if w.zeros is not None else dummy,
        w.g_idx if w.g_idx is not None else dummy, y, ws, cnt,
        m, n, k, _group_shift(w), x2.stride(0), y.stride(0), w.qweight.stride(0), k_per_split, split,
        HAS_ZERO=w.zeros is not None, HAS_GIDX=w.g_idx is not None, REDUCE=1 if atomic else 2 if serial else 0,
        SCALE_W=cfg.scale_w, S16=w.scales.dtype == x2.dtype and not upcast,
        EVEN_K=k % cfg.block_k == 0, MAGIC_BITS=magic_bits, MAGIC_VALUE=magic_value, UPCAST=upcast,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y.to(x2.dtype) if atomic else y


class Tuner:
    """Chooses a Config per (M bucket, N, K, group size, zero/g_idx layout, dtype, device) by timing the
    candidates once (median of triton.testing.do_bench); under the interpreter takes the first candidate."""

    def __init__(self):
        self.best: dict[tuple, Config] = {}
        self.timings: dict[tuple, dict[str, float]] = {}

    @staticmethod
    def key(x2: torch.Tensor, w: W4Layout) -> tuple:
        m = x2.shape[0]
        bucket = m if m <= SMALL_M else triton.next_power_of_2(m)
        return (bucket, *w.shape, w.group_size, w.zeros is not None, w.g_idx is not None, x2.dtype, x2.device)

    def config(self, x2: torch.Tensor, w: W4Layout) -> Config:
        key = self.key(x2, w)
        if key in self.best:
            return self.best[key]
        cands = candidates(x2.shape[0], w, x2.device, x2.dtype)
        forced = os.environ.get("QCONV_W4A16_CONFIG")
        if forced:
            cands = [c for c in cands if c.label() == forced] or cands
        if interpret_mode() or not x2.is_cuda or len(cands) == 1:
            self.best[key] = cands[0]
            return cands[0]
        times = {}
        for _ in range(2):  # two rounds, the better median kept: the first timings can meet a clock still rising
            for c in cands:
                if times.get(c) == float("inf"):
                    continue
                try:
                    t = triton.testing.do_bench(lambda c=c: launch(x2, w, c), warmup=5, rep=25, return_mode="median")
                except Exception:  # noqa: BLE001 - a shape the compiler or the device rejects (e.g. shared memory)
                    t = float("inf")
                times[c] = min(t, times.get(c, t))
        times = {c: t for c, t in times.items() if t != float("inf")}
        if not times:
            raise RuntimeError(f"no W4A16 launch configuration runs for {key}")
        best = min(times, key=times.get)
        self.best[key] = best
        self.timings[key] = {c.label(): t for c, t in times.items()}
        return best


TUNER = Tuner()


def w4a16_matmul(
    x: torch.Tensor, w: W4Layout, bias: torch.Tensor | None = None, config: Config | None = None
) -> torch.Tensor:
    """x [..., K] (fp16/bf16, CUDA or interpreter) → x @ dequant(w)ᵀ (+ bias) [..., N] in x's dtype."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) != k:
        x2 = x2.contiguous()
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, n)
    else:
        y = launch(x2, w, config or TUNER.config(x2, w))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)

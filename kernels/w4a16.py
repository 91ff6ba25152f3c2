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

The kernel computes yᵀ tiles: acc[BLOCK_N, BLOCK_M] += W'[BLOCK_N, BLOCK_K] · xᵀ[BLOCK_K, BLOCK_M], the unpacked
weights being the MMA's first operand (so a batch of 1–16 rows sits in the MMA's narrow N slot). A K tile lies in
one group (group_size % BLOCK_K == 0), so its scale is applied once to the tile's fp32 partial product, not to
every weight. Codes become 16-bit floats without a conversion instruction: ``code | 0x4300`` read as bfloat16 is
128 + code (``code | 0x6400`` as float16 is 1024 + code); subtracting 128 + zero in 16-bit arithmetic is exact
(small integers). Batches of ≤ 16 rows run a split-K GEMV-like schedule (partial tiles added with fp32 atomics into
a workspace); larger batches a tiled GEMM, or — for large batches, when it times faster — a dequantizing kernel
writing 16-bit weights followed by torch's matmul. Launch shapes are chosen per (M bucket, N, K, group, layout) by
timing a few candidates on the first call (``Tuner``); under TRITON_INTERPRET=1 the first candidate runs.
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
        x_ptr, qw_ptr, s_ptr, z_ptr, gidx_ptr, y_ptr,
        M, N, K, GS_SHIFT, stride_xm, stride_ym, stride_wn, k_per_split,
        HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, ATOMIC: tl.constexpr,
        EVEN_K: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr, UPCAST: tl.constexpr,
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
                acc += tl.dot(w, xt) * s[:, None]
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
        if ATOMIC:
            tl.atomic_add(y_ptrs, acc, mask=mask)
        else:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)

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
    """One launch shape: tiles, split-K factor (> 1: fp32 atomics into a workspace), warps, pipeline stages; kind
    "fused" (the W4A16 kernel) or "dequant" (16-bit weights written by a dequantizing kernel, then torch's matmul:
    for large batches, where the fused kernel's per-tile dequantization no longer hides behind the MMAs)."""

    block_n: int
    block_m: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    kind: str = "fused"

    def label(self) -> str:
        if self.kind == "dequant":
            return "dequant+matmul"
        return f"n{self.block_n}m{self.block_m}k{self.block_k}s{self.split_k}w{self.num_warps}p{self.num_stages}"


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


def candidates(m: int, w: W4Layout, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> list[Config]:
    """Launch shapes worth timing for an [m, K] × [N, K]ᵀ product (the first is the untimed default)."""
    n, k = w.shape
    if w.g_idx is not None:
        bk = 32  # any size works on the per-column path (K is masked)
    else:
        bk = next(b for b in (64, 32, 16) if w.group_size % b == 0)
    out: list[Config] = []
    if m <= SMALL_M:
        sms = _sm_count(device)
        # wider tiles amortize the loop's fixed cost (addresses, barriers) over more weights per thread
        shapes = [(128, bk), (256, bk), (64, bk)]
        if w.g_idx is None and w.group_size % 128 == 0:
            shapes.append((128, 128))
        for bn, bkk in shapes:
            # ≥ 4 programs per multiprocessor (their pipelines together keep enough bytes in flight to cover
            # DRAM latency), each still streaming ≥ 4 K tiles
            want = max(1, -(-4 * sms // triton.cdiv(n, bn)))
            split = 1
            while split < want and triton.cdiv(k, bkk) // (split * 2) >= 4:
                split *= 2
            for sp in sorted({split, max(1, split // 2)}, reverse=True):
                out.append(Config(bn, 16, bkk, sp, 4, 4))
    else:
        cap = max(32, triton.next_power_of_2(m))
        for bn, bm, warps, stages in ((64, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 4), (128, 32, 4, 4),
                                      (128, 64, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3)):  # fmt: skip
            if bm <= cap:
                out.append(Config(bn, bm, bk, 1, warps, stages))
        if m >= 256:
            out.append(Config(64, 0, 128, kind="dequant"))
    return out


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


def launch(x2: torch.Tensor, w: W4Layout, cfg: Config) -> torch.Tensor:
    """One product for a contiguous [M, K] x (already column-permuted when w.perm is set) → [M, N]."""
    m, k = x2.shape
    n = w.shape[0]
    if cfg.kind == "dequant":
        return torch.nn.functional.linear(x2, dequantize_16(w, x2.dtype))
    magic_bits, magic_value = MAGIC[x2.dtype]
    k_steps = triton.cdiv(k, cfg.block_k)
    k_per_split = triton.cdiv(k_steps, cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    atomic = split > 1
    if atomic:
        y = torch.zeros(m, n, dtype=torch.float32, device=x2.device)
    else:
        y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    dummy = w.qweight
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    _w4a16_kernel[grid](
        x2, w.qweight, w.scales, w.zeros if w.zeros is not None else dummy,
        w.g_idx if w.g_idx is not None else dummy, y,
        m, n, k, _group_shift(w), x2.stride(0), y.stride(0), w.qweight.stride(0), k_per_split,
        HAS_ZERO=w.zeros is not None, HAS_GIDX=w.g_idx is not None, ATOMIC=atomic,
        EVEN_K=k % cfg.block_k == 0, MAGIC_BITS=magic_bits, MAGIC_VALUE=magic_value,
        UPCAST=interpret_mode() and x2.dtype == torch.bfloat16,
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
        for c in cands:
            try:
                times[c] = triton.testing.do_bench(lambda c=c: launch(x2, w, c), warmup=5, rep=25, return_mode="median")
            except Exception:  # noqa: BLE001 - a shape the compiler or the device rejects (e.g. shared memory) is skipped
                continue
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

"""Fused W4A16 matmul: y = x @ dequant(W)ᵀ for 4-bit integer group layouts, in one Triton kernel.

The kernel's layout (``W4Layout``), built once at load from an on-disk layout (the file itself is never changed):
  qweight  int16 [N', K'/4]  N' = N rounded up to 64, K' = K up to 128 (padding codes are 0 and meet x = 0). Blocks
                            of 64 rows × 128 columns lie contiguously (2048 halfwords, row-major inside, blocks in
                            (row block, column block) order), so a program's K step reads whole 4 KB blocks. In a
                            block row, halfword c holds 4 codes of a 64-column super-tile t = c // 16: nibble p
                            (bits 4p) is column 64t + 16p + c % 16. So the p-th nibbles of 16 consecutive halfwords
                            are 16 consecutive columns: one shift and one mask of a register holding two halfwords
                            give two adjacent weights of a tensor-core operand.
  scales   fp16/bf16/fp32 [G, N]  transposed from the file's [N, G] so a K tile reads one contiguous row
  zeros    int16 [G, N]     asymmetric zero points in code units (unpacked from the file's [N/8, G] int32; 16 bits so
                            that OR-ing the float offset's bits makes MAGIC_VALUE + zero, like the codes); None when
                            symmetric (zero 8)
  perm     int64 [K] or None  act-order whose groups are contiguous once the columns are sorted: the columns of
                            qweight are stored in that order and x's columns are gathered the same way (this is what
                            production int4 kernels do with GPTQ act-order checkpoints)
  g_idx    int32 [K] or None  any other column → group map (scale and zero gathered per element)
  w[n, k] = (code − zero[g, n]) · scale[g, n],  g = k // group_size (or g_idx[k]).

The kernel computes yᵀ tiles: acc[BLOCK_N, BLOCK_M] += W'[BLOCK_N, ·] · xᵀ[·, BLOCK_M], the unpacked weights being
the MMA's first operand (a batch of 1–16 rows sits in the MMA's narrow N slot). A K step of BLOCK_K columns loads
BLOCK_K/4 halfwords per row and makes four products, one per nibble position p, each over the BLOCK_K/4 columns
that nibble holds (x's matching rows are loaded by address, no shuffle). Each operand is an elementwise function of
the loaded halfwords, so Triton keeps it in the registers the Hopper MMA reads (no shared-memory round trip of the
unpacked tile). Codes become 16-bit floats without a conversion: ``code | 0x4300`` read as bfloat16 is 128 + code
(``0x6400`` as float16: 1024 + code), one 32-bit LOP3 per pair of weights (inline PTX on the GPU); subtracting
MAGIC + zero in 16-bit arithmetic is exact. Scaling (``SCALE_MODE``): 0 — the exact products' float32 partial sum of
a K tile times its group's scale (K tiles inside one group); 1 — weights multiplied by their scale in 16 bits
first, one rounding as loaders do, the MMA accumulating in place (any power-of-two group, large batches); 2 — as 1
with each column's group read from g_idx. Split-K, one launch: partial tiles meet in float32 scratch laid out in
the accumulator's own order, and the last program of each output tile (an acq_rel counter it resets) writes y —
either adding one tile per split in a fixed order (deterministic), or reading the one tile every split added into
by fp32 reductions and zeroing it (half the traffic and one read: the tuner's choice unless
QCONV_W4A16_DETERMINISTIC=1). On Hopper the kernel is a programmatic dependent launch: it waits for the previous
kernel before reading x or the scratch, and lets the next launch early, so back-to-back calls overlap one's tail
with the next one's launch (after other kernels only launch latency is saved). For large batches a
dequantizing kernel writing 16-bit weights followed by torch's matmul competes too. Launch shapes are chosen per
(M bucket, N, K, group, layout) by timing the short list of ``candidates()`` (what won bench/kernels_sweep.py on
the H100) on the first call (``Tuner``); under TRITON_INTERPRET=1 the first candidate runs (plain Triton arithmetic
instead of the inline PTX).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch

from qconv.formats.bitpack import unpack_rows
from qconv.kernels import w4a16_gluon
from qconv.kernels._triton import HAVE_TRITON, interpret_mode, lazy_jit, tl, triton

HAVE_PDL = False  # programmatic dependent launch: triton ≥ 3.4 has the launch option and the grid-dependency ops
if HAVE_TRITON:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        HAVE_PDL = True
    except ImportError:  # pragma: no cover - older triton: the kernel's PDL branch is never compiled

        @triton.jit
        def gdc_wait():
            """Stand-in for older triton: the kernel compiles its PDL branch only where the real one exists."""

        @triton.jit
        def gdc_launch_dependents():
            """Stand-in for older triton (see gdc_wait)."""


# 16-bit float bit patterns: OR-ing a 4-bit code into the mantissa gives MAGIC_VALUE + code exactly.
MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}
INDEX_LIMIT = 2**31 - 1  # elements of x or y a launch may address (int32 offsets)
SMALL_M = 16  # batches up to this many rows share one M tile of 16 (the tuner buckets them one by one)
BLOCK_ROWS, BLOCK_COLS = 64, 128  # the qweight block stored contiguously (rows × columns of W)
_HALFWORDS = BLOCK_COLS // 4  # halfwords per block row


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


def _ceil(v: int, m: int) -> int:
    return -(-v // m) * m


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] → the kernel's tiled qweight int16 [N', K'/4] (see the module docstring)."""
    n, k = codes.shape
    np_, kp = _ceil(n, BLOCK_ROWS), _ceil(k, BLOCK_COLS)
    c = torch.zeros(np_, kp, dtype=torch.int16, device=codes.device)
    c[:n, :k] = codes
    c = c.view(np_, kp // 64, 4, 16)  # [row, super-tile, nibble p, halfword-in-super-tile]
    # int16 shifts wrap: code << 12 lands in the sign bit as the bit pattern wants
    h = (c[:, :, 0] | (c[:, :, 1] << 4) | (c[:, :, 2] << 8) | (c[:, :, 3] << 12)).view(np_, kp // 4)
    tiles = h.view(np_ // BLOCK_ROWS, BLOCK_ROWS, kp // BLOCK_COLS, _HALFWORDS).permute(0, 2, 1, 3)
    return tiles.contiguous().view(np_, kp // 4)


def unpack_codes(qweight: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of pack_codes: int16 [N', K'/4] → uint8 codes [N, K] (shape = (N, K))."""
    n, k = shape
    np_, kq = qweight.shape
    h = qweight.view(np_ // BLOCK_ROWS, kq // _HALFWORDS, BLOCK_ROWS, _HALFWORDS).permute(0, 2, 1, 3)
    h = h.reshape(np_, kq // 16, 1, 16).to(torch.int32) & 0xFFFF
    c = (h >> torch.tensor([0, 4, 8, 12], device=h.device).view(1, 1, 4, 1)) & 0xF
    return c.reshape(np_, kq * 4)[:n, :k].to(torch.uint8)


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
    gs = k if group_size in (-1, None) else group_size
    zeros = None if zeros_ng is None else zeros_ng.T.to(torch.int16).contiguous()
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
    """Whether contiguous groups can run on the static path (a column's group found by a shift): a power-of-two
    group of ≥ 16 columns, or one group spanning K."""
    if group_size >= k:
        return True
    return group_size >= 16 and group_size & (group_size - 1) == 0


# ---------------------------------------------------------------------------------------------------------------
# Torch reference


def dequantize(w: W4Layout) -> torch.Tensor:
    """float32 [N, K] in the weight's original column order, computed from the kernel layout in plain torch."""
    n, k = w.shape
    codes = unpack_codes(w.qweight, w.shape).float()
    # act-order stored sorted (perm) has static groups in the stored column order, like no act-order
    group = w.g_idx.long() if w.g_idx is not None else torch.arange(k, device=codes.device) // w.group_size
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


@functools.cache
def asm_codes(magic_bits: int) -> tuple[str, str, str, str, str]:
    """PTX turning nibble p (p = 0…3) of each of two halfwords in a 32-bit register into two 16-bit floats
    MAGIC_VALUE + code (a shift, then one LOP3 computing (v & 0x000F000F) | magic·0x10001), and last the zero
    points' form: int16 zero | magic·0x10001 is MAGIC_VALUE + zero."""
    m = f"0x{magic_bits * 0x10001:08X}"
    lop = "lop3.b32 $0, {src}, 0x000F000F, " + m + ", 0xEA;"
    shifted = tuple(
        "{ .reg .b32 t; shr.b32 t, $1, " + str(4 * p) + "; " + lop.format(src="t") + " }" for p in (1, 2, 3)
    )
    return (lop.format(src="$1"), *shifted, f"or.b32 $0, $1, {m};")


if HAVE_TRITON:

    @lazy_jit
    def _w4a16_kernel(
        x_ptr, qw_ptr, s_ptr, z_ptr, gidx_ptr, y_ptr, ws_ptr, cnt_ptr,
        M, N, K, G, KB, GS_SHIFT, stride_xm, stride_ym, k_per_split, n_split,
        HAS_ZERO: tl.constexpr, SCALE_MODE: tl.constexpr, REDUCE: tl.constexpr, S16: tl.constexpr,
        EVEN_K: tl.constexpr, SLICE_GROUPS: tl.constexpr, MAGIC_VALUE: tl.constexpr, ASM: tl.constexpr,
        UPCAST: tl.constexpr, ASMZ: tl.constexpr, PDL: tl.constexpr,
        EV_W: tl.constexpr, EV_WS: tl.constexpr,
        ASM0: tl.constexpr, ASM1: tl.constexpr, ASM2: tl.constexpr, ASM3: tl.constexpr,
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
        offs_j = tl.arange(0, BLOCK_K // 4)  # halfwords of a row in this K step
        koff = (offs_j // 16) * 64 + offs_j % 16  # column (from k0) of nibble 0 of halfword j
        row_off = (offs_n // 64) * (KB * 2048) + (offs_n % 64) * 32
        xdt = x_ptr.dtype.element_ty
        cdt = tl.float32 if UPCAST else xdt  # the interpreter keeps bfloat16 as raw bits: it computes in float32
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(K, k_lo + k_per_split)
        if SCALE_MODE == 0:
            # the next K tile's scale row is loaded one step ahead (registers): the pipeliner stages only the dot
            # operands, and a load issued just before its use would stall every tile
            s_next = tl.load(s_ptr + (k_lo >> GS_SHIFT) * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if not HAS_ZERO:
            zz = tl.full((BLOCK_N, BLOCK_K // 4), 8.0 + MAGIC_VALUE, cdt)
        if PDL:
            # launched as a programmatic dependent: the launch and the lines above overlap the previous kernel's
            # tail (they read only this weight's scales, which no kernel is expected to write between calls); x, the
            # scratch tiles and the counters are touched only once it has finished and flushed. The next kernel may
            # then launch (it waits the same way before touching anything)
            gdc_wait()
            gdc_launch_dependents()
        for k0 in range(k_lo, k_hi, BLOCK_K):
            # k0 // 4 + offs_j's place in the blocks, written so that the compiler sees runs of ≥ 8 halfwords at
            # 16-byte aligned addresses (16-byte copies; from (kh // 32) * 2048 + kh % 32 it proved 8 bytes)
            k_base = tl.multiple_of((k0 // 128) * 2048 + (k0 % 128) // 4, 16)
            words = tl.load(qw_ptr + row_off[:, None] + (k_base + (offs_j // 32) * 2048 + offs_j % 32)[None, :],
                            mask=n_mask[:, None], other=0, eviction_policy=EV_W)  # fmt: skip
            if SCALE_MODE == 0:
                s = s_next
                s_next = tl.load(s_ptr + (tl.minimum(k0 + BLOCK_K, K - 1) >> GS_SHIFT) * N + offs_n, mask=n_mask,
                                 other=0.0).to(tl.float32)  # fmt: skip
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for p in tl.static_range(4):
                kx = k0 + koff + 16 * p  # the columns nibble p of this step's halfwords hold
                x_ptrs = x_ptr + offs_m[None, :] * stride_xm + kx[:, None]
                if EVEN_K:
                    xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
                else:
                    xt = tl.load(x_ptrs, mask=m_mask[None, :] & (kx < K)[:, None], other=0.0)
                if UPCAST:
                    xt = xt.to(tl.float32)
                # per-element scale and zero rows, as 2-D loads (a broadcast row would break the operand's
                # elementwise chain from load to MMA): once per step where groups span ≥ 64 columns (the four
                # slices of a halfword share their group), per slice for g_idx or smaller groups
                if (SCALE_MODE != 0 or HAS_ZERO) and (SLICE_GROUPS or p == 0):
                    if SCALE_MODE == 2:
                        g = tl.load(gidx_ptr + tl.minimum(kx, K - 1))
                    elif SCALE_MODE == 1:
                        g = tl.minimum(kx >> GS_SHIFT, G - 1)  # padding columns (x = 0) clamp to a real group
                    else:
                        g = (k0 >> GS_SHIFT) + offs_j * 0  # the step lies inside one group
                    sz_off = g[None, :] * N + offs_n[:, None]
                    if SCALE_MODE != 0:
                        sc = tl.load(s_ptr + sz_off, mask=n_mask[:, None], other=0.0)
                    if HAS_ZERO:
                        zt = tl.load(z_ptr + sz_off, mask=n_mask[:, None], other=0)
                        if ASM:  # MAGIC_VALUE + zero by OR-ing the offset's bits, two per register (no conversion)
                            zz = tl.inline_asm_elementwise(ASMZ, "=r,r", [zt], xdt, True, 2)
                        else:
                            zz = (zt.to(tl.float32) + MAGIC_VALUE).to(cdt)
                if ASM:  # ASMp (asm_codes): nibble p as MAGIC_VALUE + code, two halfwords per 32-bit register
                    if p == 0:
                        w = tl.inline_asm_elementwise(ASM0, "=r,r", [words], xdt, True, 2)
                    elif p == 1:
                        w = tl.inline_asm_elementwise(ASM1, "=r,r", [words], xdt, True, 2)
                    elif p == 2:
                        w = tl.inline_asm_elementwise(ASM2, "=r,r", [words], xdt, True, 2)
                    else:
                        w = tl.inline_asm_elementwise(ASM3, "=r,r", [words], xdt, True, 2)
                else:
                    w = (((words >> (4 * p)) & 0xF).to(tl.float32) + MAGIC_VALUE).to(cdt)
                w = w - zz  # code − zero, exact in 16 bits
                if SCALE_MODE == 0:
                    part = tl.dot(w, xt, part)
                else:  # (code − zero)·scale rounded once to 16 bits, as loaders do; the MMA accumulates in place
                    if S16:
                        w = w * sc
                    else:
                        w = (w.to(tl.float32) * sc.to(tl.float32)).to(xdt).to(cdt)
                    acc = tl.dot(w, xt, acc)
            if SCALE_MODE == 0:  # exact weights: the group's scale multiplies the step's float32 partial product
                acc += part * s[:, None]
        y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None]
        mask = n_mask[:, None] & m_mask[None, :]
        if REDUCE == 0:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            # split-K: partial tiles meet in a float32 workspace laid out tile by tile in the accumulator's own order
            # (row n, then m: a thread's adjacent m are adjacent words; no mask but M's); the last
            # program of an output tile (an acq_rel counter, which it resets for the next launch) writes y.
            # REDUCE 1: every split adds into one self-cleaning tile (fp32 reductions; the last exchanges it for
            # zeros); REDUCE 2: one tile per split, added by the last in split order (deterministic)
            tile_off = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
            m_ok = m_mask[None, :] & (tile_off >= 0)
            n_tiles = tl.num_programs(0)
            if REDUCE == 1:
                ws_tile = ws_ptr + pid * (BLOCK_N * BLOCK_M) + tile_off
                tl.atomic_add(ws_tile, acc, mask=m_ok, sem="relaxed")
            else:
                tl.store(ws_ptr + (pid_k * n_tiles + pid) * (BLOCK_N * BLOCK_M) + tile_off, acc, mask=m_ok,
                         eviction_policy=EV_WS)  # fmt: skip
            # every thread's partial tile before the one thread's release below (triton 3.6 happens to place a
            # barrier here for its own shared-memory reasons; correctness should not rest on that)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if done == n_split - 1:
                if REDUCE == 1:
                    # read and zero in one exchange: a load and a store of zeros are free to sit in different thread
                    # layouts, and a thread could zero a sum before another thread had read it
                    # (as int32 bits: the interpreter exchanges integers only)
                    zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
                    bits = tl.atomic_xchg(ws_tile.to(tl.pointer_type(tl.int32)), zero, mask=m_ok, sem="relaxed")
                    total = tl.where(m_ok, bits, 0).to(tl.float32, bitcast=True)
                else:
                    total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                    for sk in range(n_split):
                        total += tl.load(ws_ptr + (sk * n_tiles + pid) * (BLOCK_N * BLOCK_M) + tile_off, mask=m_ok,
                                         other=0.0, cache_modifier=".cg")  # fmt: skip
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(cnt_ptr + pid, 0)

    @lazy_jit
    def _w4_dequant_kernel(
        qw_ptr, s_ptr, z_ptr, gidx_ptr, out_ptr, N, K, G, KB, GS_SHIFT,
        HAS_ZERO: tl.constexpr, HAS_GIDX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """W4Layout → 16-bit weights [N, K] in qweight's column order (out_ptr's dtype), for the large-batch path."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n_mask = offs_n < N
        offs_j = tl.arange(0, BLOCK_K // 4)
        kh = k0 // 4 + offs_j
        row_off = (offs_n // 64) * (KB * 2048) + (offs_n % 64) * 32
        words = tl.load(qw_ptr + row_off[:, None] + ((kh // 32) * 2048 + kh % 32)[None, :], mask=n_mask[:, None],
                        other=0)  # fmt: skip
        for p in tl.static_range(4):
            kx = k0 + (offs_j // 16) * 64 + offs_j % 16 + 16 * p
            k_ok = kx < K
            if HAS_GIDX:
                g = tl.load(gidx_ptr + kx, mask=k_ok, other=0)
            else:
                g = tl.minimum(kx >> GS_SHIFT, G - 1)
            mask = n_mask[:, None] & k_ok[None, :]
            s = tl.load(s_ptr + g[None, :] * N + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g[None, :] * N + offs_n[:, None], mask=mask, other=0).to(tl.float32)
            else:
                z = 8.0
            w = (((words >> (4 * p)) & 0xF).to(tl.float32) - z) * s
            tl.store(out_ptr + offs_n[:, None] * K + kx[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Config:
    """One launch shape: tiles, split-K factor, warps, pipeline stages, and kind:

    - "fused": the tensor-core W4A16 kernel (BLOCK_K a multiple of 64). split_k > 1 splits K over programs whose
      partial tiles meet in a float32 workspace, added by the last program of each tile in split order, or with
      ``atomic`` added as they come by fp32 reductions into one self-cleaning tile (less traffic; the order, so the
      last bits, may vary between runs); one launch either way. ``scale_w``: weights scaled
      and rounded to 16 bits before the MMA (as loaders do; one accumulator) instead of scaling each K tile's exact
      partial product (which needs K tiles inside one group: forced where the layout has no such tiles). ``pdl``:
      launched as a programmatic dependent (Hopper): waits for the previous kernel inside, lets the next launch
      early. ``evict``: weight loads marked evict-first, and fixed-order partial tiles evict-last, in L2.
    - "dequant": 16-bit weights written by a dequantizing kernel, then torch's matmul (large batches).
    - "gluon": kernels/w4a16_gluon.py (Hopper, large batches): block_n weight rows × block_m batch rows, its
      products asynchronous; weights scaled before the MMA like ``scale_w``. split_k programs per output tile, or
      with ``stream_k`` per_sm persistent programs per multiprocessor sharing all tiles' K steps evenly; ``per_sm``
      programs resident per multiprocessor (registers capped to fit); ``loader_warp``: x loaded by a warp of its
      own; split tiles' parts are summed in program order (block_k, num_stages, scale_w, atomic, pdl and evict do
      not apply; ``stream_k`` overrides split_k).
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
    pdl: bool = False
    evict: bool = False
    per_sm: int = 1
    stream_k: bool = False
    loader_warp: bool = False

    def label(self) -> str:
        if self.kind == "dequant":
            return "dequant+matmul"
        if self.kind == "gluon":
            extra = "-sk" if self.stream_k else (f"-s{self.split_k}" if self.split_k > 1 else "")
            extra += "-lw" if self.loader_warp else ""
            return f"gluon-n{self.block_n}m{self.block_m}w{self.num_warps}x{self.per_sm}{extra}"
        extra = ("r" if self.scale_w else "") + ("a" if self.atomic else "")
        extra += ("d" if self.pdl else "") + ("e" if self.evict else "")
        return (f"n{self.block_n}m{self.block_m}k{self.block_k}s{self.split_k}w{self.num_warps}"
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


def exact_k_tile(w: W4Layout) -> int | None:
    """The K step of the exact path (scale applied to each step's float32 product): 128 or 64 columns inside one
    group; None where the layout has none (g_idx, groups under 64 columns or not a multiple of 64)."""
    if w.g_idx is not None:
        return None
    if w.n_groups == 1 or w.group_size % 128 == 0:
        return 128
    return 64 if w.group_size % 64 == 0 else None


def candidates(
    m: int, w: W4Layout, device: torch.device, dtype: torch.dtype = torch.bfloat16, deterministic: bool = False
) -> list[Config]:
    """Launch shapes worth timing for an [m, K] × [N, K]ᵀ product (the first is the untimed default).

    The short lists are what won bench/kernels_sweep.py on the H100 (BENCHMARKS.md, kernels (#6)): up to 16 rows —
    128/256 × 16 tiles of 128 columns, split so the grid holds ~1–4 programs per multiprocessor; up to 64 rows —
    256 × 64 or 128 × 64; up to 128 rows — 256 × 128 with weights scaled before the MMA (the largest weights), or
    256/128 × 64 exact; larger batches — 256 × 128 and 128 × 128 tiles, and dequantize + matmul. Above 64 rows on
    Hopper with static groups, the Gluon kernel instead (``_gluon_candidates``; BENCHMARKS.md): up to 128 rows
    64/128 × 128 tiles, two programs per multiprocessor, beside the Triton 256 × 128 shape; beyond, 128 × 256 and
    128 × 128 tiles with a loader warp and 128 × 128 two per multiprocessor, beside dequantize + matmul (each tile
    whole, split 2 or 4 ways, or stream-K; the parts summed in program order, so deterministic). Layouts without
    an exact K tile scale weights before the MMA. On Hopper every fused shape is a programmatic dependent launch.
    Split-K partial tiles of up to 16 rows meet in fp32 reductions (``atomic``), wider ones both ways (the tuner
    times each); ``deterministic`` keeps only the fixed-order sum. Up to 64 rows and with reductions, weights stream
    evict-first past the partial tiles kept in L2 (128-row reductions ran ~20 % slower without; larger batches
    re-read a weight tile for each row block, from L2).
    """
    n, k = w.shape
    sms = _sm_count(device)
    bk_exact = exact_k_tile(w)
    exact = bk_exact is not None
    tiles = lambda bn, bm: triton.cdiv(m, bm) * triton.cdiv(n, bn)  # noqa: E731
    pdl = HAVE_PDL and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)
    gluon = m > 64 and w4a16_gluon.usable(device, w)

    def cfg(bn: int, bm: int, per_sm: int, warps: int, stages: int, scale_w: bool = False) -> list[Config]:
        sw = scale_w or not exact
        bk = 128 if sw else bk_exact
        split = _split(tiles(bn, bm), k, bk, per_sm, sms)
        c = Config(bn, bm, bk, split, warps, stages, scale_w=sw, pdl=pdl, evict=m <= 64)
        if split == 1 or deterministic:
            return [c]
        red = replace(c, atomic=True, evict=True)
        # reductions win for 16-row tiles; for wider ones the partial tiles' traffic and the atomics' cost vary
        return [red] if m <= SMALL_M else [red, c]

    if m <= SMALL_M:
        shapes = [cfg(128, 16, 3, 4, 3), cfg(128, 16, 4, 4, 3), cfg(128, 16, 2, 4, 3), cfg(256, 16, 2, 8, 3),
                  cfg(256, 16, 4, 8, 3), cfg(256, 16, 1, 8, 3), cfg(64, 16, 2, 4, 4)]  # fmt: skip
    elif m <= 64:
        shapes = [cfg(256, 64, 1, 8, 3), cfg(128, 64, 2, 4, 3)]
    elif m <= 128 and gluon:
        shapes = [cfg(256, 128, 1, 8, 3, True)] + _gluon_candidates(m, n, k, sms, ((64, 128, 4), (128, 128, 8)), 2)
    elif m <= 128:
        shapes = [cfg(256, 128, 1, 8, 3, True), cfg(256, 64, 1, 8, 3), cfg(128, 64, 2, 4, 3), cfg(128, 64, 2, 8, 4),
                  cfg(256, 128, 2, 8, 3, True)]  # fmt: skip
    elif gluon:
        shapes = _gluon_candidates(m, n, k, sms, ((128, 256, 8), (128, 128, 8)), 1)
        shapes += [[Config(128, 128, 128, 1, 8, kind="gluon", per_sm=2)], [Config(64, 0, 128, kind="dequant")]]
    else:
        shapes = [cfg(256, 128, 1, 8, 3, True), cfg(256, 128, 1, 16, 3, True), cfg(128, 128, 1, 8, 4),
                  [Config(64, 0, 128, kind="dequant")]]  # fmt: skip
    out = [c for variants in shapes for c in variants]
    return list(dict.fromkeys(out))


def _gluon_candidates(m: int, n: int, k: int, sms: int, tiles: tuple, per_sm: int) -> list[list[Config]]:
    """Gluon launch shapes for [m, K] × [N, K]ᵀ: each (block_n, block_m, warps) tile with per_sm programs per
    multiprocessor (registers capped to fit; x through the multiplying warps) or, for one program per
    multiprocessor, with a loader warp; one program per tile, 2 or 4 per tile where the grid still fits on the
    device at once (the parts summed in program order), and stream-K where the tiles overfill it."""
    out = []
    for bn, bm, warps in tiles:
        base = Config(bn, bm, 128, 1, warps, kind="gluon", per_sm=per_sm, loader_warp=per_sm == 1)
        t = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        out.append([base])
        out += [[replace(base, split_k=s)] for s in (2, 4) if t * s <= per_sm * sms and triton.cdiv(k, 128) >= 4 * s]
        if t > per_sm * sms:
            out.append([replace(base, stream_k=True)])
    return out


def dequantize_16(w: W4Layout, dtype: torch.dtype) -> torch.Tensor:
    """Triton: W4Layout → ``dtype`` weights [N, K] in qweight's column order (x must be gathered by w.perm)."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.qweight.device)
    dummy = w.qweight
    _w4_dequant_kernel[(triton.cdiv(n, 64), triton.cdiv(k, BLOCK_COLS))](
        w.qweight, w.scales, w.zeros if w.zeros is not None else dummy, w.g_idx if w.g_idx is not None else dummy,
        out, n, k, w.n_groups, w.qweight.shape[1] // _HALFWORDS, _group_shift(w),
        HAS_ZERO=w.zeros is not None, HAS_GIDX=w.g_idx is not None, BLOCK_N=64, BLOCK_K=BLOCK_COLS, num_warps=4,
    )  # fmt: skip
    return out


_SCRATCH: dict[tuple, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def _scratch(device: torch.device, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Zeros [≥ n] of ``dtype`` on ``device``, kept between calls: the split-K kernels count arrivals per output
    tile ("counts") or add partial tiles ("sums") in them, and the last arrival of each tile zeroes what it used, so
    they are zero again after every launch. Split-K launches sharing them must not run concurrently (one stream, or
    streams ordered by events, as w4a16_matmul says; per-stream sets would cost their memory on every stream).

    Inside a CUDA-graph capture a buffer that does not exist yet (or is too small) is the graph's own: allocated
    and zeroed by nodes of the graph at each replay, never handed to eager calls (which would otherwise read
    memory the replay has not zeroed yet)."""
    key = (device, name)
    buf = _SCRATCH.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=dtype, device=device)
    if buf is not None:
        _OUTGROWN.append(buf)  # a captured CUDA graph may still point at it: never freed
    buf = torch.zeros(max(2 * n, 1 << 14), dtype=dtype, device=device)  # doubling: few outgrown buffers
    _SCRATCH[key] = buf
    return buf


LAST_KERNEL = None  # the compiled kernel of the latest launch (bench/kernels_sweep.py reads its registers, spills)


def launch(x2: torch.Tensor, w: W4Layout, cfg: Config) -> torch.Tensor:
    """One product for a contiguous [M, K] x (already column-permuted when w.perm is set) → [M, N]."""
    global LAST_KERNEL
    m, k = x2.shape
    n = w.shape[0]
    if cfg.kind == "dequant":
        return torch.nn.functional.linear(x2, dequantize_16(w, x2.dtype))
    if cfg.kind == "gluon":
        if not w4a16_gluon.supported(x2, w):
            raise ValueError(f"{cfg.label()}: needs a Hopper GPU, triton's Gluon, static groups and K % 16 == 0")
        return w4a16_gluon.launch(
            x2,
            w,
            cfg.block_n,
            cfg.block_m,
            cfg.num_warps,
            per_sm=cfg.per_sm,
            split=cfg.split_k,
            stream_k=cfg.stream_k,
            loader_warp=cfg.loader_warp,
        )
    if cfg.block_k % 64:
        raise ValueError(f"the W4A16 kernel steps K by multiples of 64 columns, not {cfg.block_k}")
    if w.g_idx is not None:
        mode = 2
    elif cfg.scale_w:
        mode = 1
    else:
        bk = exact_k_tile(w)
        if bk is None or bk % cfg.block_k:
            raise ValueError(f"{cfg.label()}: exact K steps need {cfg.block_k} columns inside one group "
                             f"(group {w.group_size}); use scale_w")  # fmt: skip
        mode = 0
    k_steps = triton.cdiv(k, cfg.block_k)
    k_per_split = triton.cdiv(k_steps, cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    reduce = 0 if split == 1 else 1 if cfg.atomic else 2
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    magic_bits, magic_value = MAGIC[x2.dtype]
    interpreting = interpret_mode()
    upcast = interpreting and x2.dtype == torch.bfloat16
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    tile_floats = tiles * cfg.block_n * cfg.block_m
    if reduce == 1:
        ws = _scratch(x2.device, "sums", tile_floats, torch.float32)
    elif reduce == 2:
        ws = torch.empty(split * tile_floats, dtype=torch.float32, device=x2.device)
    else:
        ws = y
    dummy = w.qweight
    cnt = _scratch(x2.device, "counts", tiles, torch.int32) if reduce else dummy
    a0, a1, a2, a3, az = asm_codes(magic_bits)
    pdl = cfg.pdl and not interpreting
    pdl_launch = {"launch_pdl": True} if pdl else {}  # (older triton has no such launch option)
    LAST_KERNEL = _w4a16_kernel[(tiles, split)](
        x2, w.qweight, w.scales, w.zeros if w.zeros is not None else dummy,
        w.g_idx if w.g_idx is not None else dummy, y, ws, cnt,
        m, n, k, w.n_groups, w.qweight.shape[1] // _HALFWORDS, _group_shift(w), x2.stride(0), y.stride(0),
        k_per_split, split,
        HAS_ZERO=w.zeros is not None, SCALE_MODE=mode, REDUCE=reduce,
        S16=w.scales.dtype == x2.dtype and not upcast, EVEN_K=k % cfg.block_k == 0,
        SLICE_GROUPS=mode == 2 or (mode == 1 and w.n_groups > 1 and w.group_size < 64), MAGIC_VALUE=magic_value,
        ASM=not interpreting, UPCAST=upcast, ASMZ=az, PDL=pdl,
        EV_W="evict_first" if cfg.evict else "", EV_WS="evict_last" if cfg.evict else "",
        ASM0=a0, ASM1=a1, ASM2=a2, ASM3=a3,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch,
    )  # fmt: skip
    return y


def _copies(w: W4Layout, nbytes: int) -> list[W4Layout]:
    """w and fresh copies of its tensors, together at least ``nbytes`` (one is enough for a weight that large)."""
    n = max(1, -(-nbytes // max(1, w.nbytes())))
    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    return [w] + [replace(w, qweight=w.qweight.clone(), scales=w.scales.clone(), zeros=clone(w.zeros))
                  for _ in range(n - 1)]  # fmt: skip


def graph_time(fns: list, reps: int = 5) -> float:
    """Median ms per call of ``fns`` (called in turn, ≥ 24 calls) replayed from one CUDA graph: no launch overhead,
    and with enough distinct weights the calls stream them from memory as a model's layers do."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns:
            f()
        calls = max(len(fns), 24)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(calls):
                fns[i % len(fns)]()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    return sorted(times)[len(times) // 2]


def _deterministic() -> bool:
    return os.environ.get("QCONV_W4A16_DETERMINISTIC", "0") == "1"


class Tuner:
    """Chooses a Config per (M bucket, N, K, group size, zero/g_idx layout, dtype, device) by timing the
    candidates once; under the interpreter takes the first candidate. QCONV_W4A16_DETERMINISTIC=1 leaves out the
    split-K shapes whose fp32 reductions may round differently from run to run.

    Timing: CUDA-graph replays (launch overhead out, as in a decode graph) cycling through copies of the weight
    totalling twice the L2 cache, so every call reads its weight from HBM like a model's layers do (a cache flush
    between calls would add the flush's write-backs to the kernel; the same weight over and over would time L2).
    The copies exist only while tuning."""

    def __init__(self):
        self.best: dict[tuple, Config] = {}
        self.timings: dict[tuple, dict[str, float]] = {}

    @staticmethod
    def key(x2: torch.Tensor, w: W4Layout) -> tuple:
        m = x2.shape[0]
        bucket = m if m <= SMALL_M else triton.next_power_of_2(m)
        return (bucket, *w.shape, w.group_size, w.zeros is not None, w.g_idx is not None, x2.dtype, x2.device,
                _deterministic())  # fmt: skip

    def config(self, x2: torch.Tensor, w: W4Layout) -> Config:
        key = self.key(x2, w)
        if key in self.best:
            return self.best[key]
        cands = candidates(x2.shape[0], w, x2.device, x2.dtype, _deterministic())
        forced = os.environ.get("QCONV_W4A16_CONFIG")
        if forced:
            cands = [c for c in cands if c.label() == forced] or cands
        if interpret_mode() or not x2.is_cuda or len(cands) == 1:
            self.best[key] = cands[0]
            return cands[0]
        if torch.cuda.is_current_stream_capturing():  # a caller's graph capture: no timing inside it, nothing kept
            return cands[0]
        props = torch.cuda.get_device_properties(x2.device)
        ws = _copies(w, 2 * getattr(props, "L2_cache_size", 50 << 20))
        times = {}
        for _ in range(2):  # two rounds, the better median kept: the first timings can meet a clock still rising
            for c in cands:
                if times.get(c) == float("inf"):
                    continue
                try:
                    t = graph_time([lambda c=c, wc=wc: launch(x2, wc, c) for wc in ws])
                except Exception:  # noqa: BLE001 - a shape the compiler or the device rejects (e.g. shared memory)
                    t = float("inf")
                times[c] = min(t, times.get(c, t))
        del ws
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
    """x [..., K] (fp16/bf16, CUDA or interpreter) → x @ dequant(w)ᵀ (+ bias) [..., N] in x's dtype.

    Split-K launches on one device share scratch buffers: calls on different streams must be ordered (events), not
    concurrent."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) != k:
        x2 = x2.contiguous()
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    rows = INDEX_LIMIT // max(n, k)  # the kernels index x and y in int32: larger batches go in row blocks
    if x2.shape[0] == 0:
        y = x2.new_zeros(0, n)
    elif x2.shape[0] > rows:
        y = torch.cat([w4a16_matmul(x2[i : i + rows], w, config=config) for i in range(0, x2.shape[0], rows)])
    else:
        y = launch(x2, w, config or TUNER.config(x2, w))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)

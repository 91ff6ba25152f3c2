"""Triton dequantization of raw GGML block bytes (GGUF tensors), one kernel per block type.

Contract (same keywords as the "ggml" layout's torch reference, ``qconv.formats.ggml_blocks.dequantize``):
  raw        uint8 [n_bytes] or [rows, row_bytes]: row-major blocks of TYPE_SIZE[t] bytes, each BLOCK_SIZE[t] values
  ggml_type  int, a GGMLType in KERNEL_TYPES
  shape      tuple whose product is the element count (a multiple of the block size)
  → float32 ``shape``.

Each program dequantizes ``BLOCK_B`` consecutive blocks as a [BLOCK_B, QK] tile: every element gathers its own
quant byte(s) and its block's scales from the raw bytes (so the kernels need no alignment), and the tile is
stored as one contiguous run. Bit-exactness with the reference (and with ggml / gguf-py) comes from doing the
same float32 operations in the same order: fp16 scales widened exactly, K-quant sub-block scales formed as
``d * sc`` before multiplying the quant, affine types ``(d·q) + m`` / ``(dl·q) − ml`` as two roundings. The
kernels are launched with ``enable_fp_fusion=False`` so the CUDA compiler cannot contract those into FMAs
(the interpreter ignores the option: numpy never fuses).

NaN: results agree wherever the reference is not NaN; NaN payloads are not reproduced on GPU (NVIDIA arithmetic
returns a canonical NaN), which does not matter to verification: a NaN never compares equal anyway.
"""

from __future__ import annotations

import functools
import math

import torch

from qconv.formats.ggml_blocks import BLOCK_SIZE, KVALUES_IQ4NL, KVALUES_MXFP4, TYPE_SIZE, GGMLType
from qconv.kernels._triton import HAVE_TRITON, interpret_mode, lazy_jit, tl, triton


def dequant_reference(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Plain torch (``ggml_blocks.dequantize``, bit-exact to gguf-py): float32 ``shape``."""
    from qconv.formats.ggml_blocks import dequantize

    return dequantize(raw, ggml_type, math.prod(shape)).reshape(shape)


if HAVE_TRITON:
    # Common to every kernel: program ``pid`` owns blocks [pid·BLOCK_B, pid·BLOCK_B + BLOCK_B); ``blk`` [BB, 1]
    # block ids, ``i`` [1, QK] element index inside a block, ``base`` [BB, 1] int64 byte offset of each block.
    # fp16 fields are assembled from two little-endian bytes and bitcast (no alignment needed), then widened.

    @lazy_jit
    def _q8_0_kernel(raw_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
        i = tl.arange(0, 32)[None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * 34
        lo = tl.load(raw_ptr + base, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 1, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        q = tl.load(raw_ptr + base + 2 + i, mask=bm, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        tl.store(out_ptr + blk.to(tl.int64) * 32 + i, q * d, mask=bm)

    @lazy_jit
    def _q4_0_kernel(raw_ptr, tab_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr, CODEBOOK: tl.constexpr):
        """Q4_0 (value d·(q − 8)) and IQ4_NL (value d·kvalues[q]): same 18-byte block, d then 16 nibble bytes
        (element j in the low nibble of byte j, element j + 16 in the high)."""
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
        i = tl.arange(0, 32)[None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * 18
        lo = tl.load(raw_ptr + base, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 1, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        qb = tl.load(raw_ptr + base + 2 + (i % 16), mask=bm, other=0).to(tl.int32)
        q = (qb >> ((i // 16) * 4)) & 0xF
        if CODEBOOK:
            v = tl.load(tab_ptr + q)
        else:
            v = (q - 8).to(tl.float32)
        tl.store(out_ptr + blk.to(tl.int64) * 32 + i, d * v, mask=bm)

    @lazy_jit
    def _q4_1_kernel(raw_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
        i = tl.arange(0, 32)[None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * 20
        lo = tl.load(raw_ptr + base, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 1, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        lo = tl.load(raw_ptr + base + 2, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 3, mask=bm, other=0).to(tl.uint16)
        m = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        qb = tl.load(raw_ptr + base + 4 + (i % 16), mask=bm, other=0).to(tl.int32)
        q = ((qb >> ((i // 16) * 4)) & 0xF).to(tl.float32)
        tl.store(out_ptr + blk.to(tl.int64) * 32 + i, d * q + m, mask=bm)

    @lazy_jit
    def _q5_kernel(
        raw_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr, AFFINE: tl.constexpr, TS: tl.constexpr, QH: tl.constexpr
    ):
        """Q5_0 (d, qh[4], qs[16]; value d·(q − 16)) and Q5_1 (d, m, qh[4], qs[16]; value d·q + m). Bit 4 of
        element j is bit j of the little-endian u32 qh; the low nibbles are split as in Q4_0."""
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
        i = tl.arange(0, 32)[None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * TS
        lo = tl.load(raw_ptr + base, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 1, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        hb = tl.load(raw_ptr + base + QH + i // 8, mask=bm, other=0).to(tl.int32)
        qb = tl.load(raw_ptr + base + QH + 4 + (i % 16), mask=bm, other=0).to(tl.int32)
        q = ((qb >> ((i // 16) * 4)) & 0xF) | (((hb >> (i % 8)) & 1) << 4)
        if AFFINE:
            lo = tl.load(raw_ptr + base + 2, mask=bm, other=0).to(tl.uint16)
            hi = tl.load(raw_ptr + base + 3, mask=bm, other=0).to(tl.uint16)
            m = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            w = d * q.to(tl.float32) + m
        else:
            w = d * (q - 16).to(tl.float32)
        tl.store(out_ptr + blk.to(tl.int64) * 32 + i, w, mask=bm)

    @lazy_jit
    def _mxfp4_kernel(raw_ptr, tab_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
        """ggml MXFP4 (e8m0 exponent byte, 16 nibble bytes split as Q4_0): value half_scale(e) · kvalues2[q],
        half_scale(e) = 2^(e − 128) built from its bits (a subnormal for e < 2), as ggml_e8m0_to_fp32_half."""
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
        i = tl.arange(0, 32)[None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * 17
        e = tl.load(raw_ptr + base, mask=bm, other=0).to(tl.int32)
        bits = tl.where(e < 2, 0x00200000 << tl.minimum(e, 1), (e - 1) << 23)  # shift < 32 in every lane
        s = bits.to(tl.float32, bitcast=True)
        qb = tl.load(raw_ptr + base + 1 + (i % 16), mask=bm, other=0).to(tl.int32)
        v = tl.load(tab_ptr + ((qb >> ((i // 16) * 4)) & 0xF))
        tl.store(out_ptr + blk.to(tl.int64) * 32 + i, s * v, mask=bm)

    # Super-block types: the tile is [BLOCK_B, NSUB, SUB] (block, sub-block, element in sub-block), so sub-block
    # scales are loaded once per sub-block ([BB, NSUB, 1]) and broadcast; i = k·SUB + j is the element's index.

    @lazy_jit
    def _q2_k_kernel(raw_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
        """Q2_K, 84 bytes: scales[16] (sc low nibble, m high, one per 16 values), qs[64] (2-bit planes in runs of
        32 bytes: element 128r + 32s + j at bits 2s of byte 32r + j), d, dmin. value (d·sc)·q − (dmin·m)."""
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
        k = tl.arange(0, 16)[None, :, None]
        i = k * 16 + tl.arange(0, 16)[None, None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * 84
        lo = tl.load(raw_ptr + base + 80, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 81, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        lo = tl.load(raw_ptr + base + 82, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 83, mask=bm, other=0).to(tl.uint16)
        dmin = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        sb = tl.load(raw_ptr + base + k, mask=bm, other=0).to(tl.int32)
        dl = d * (sb & 0xF).to(tl.float32)
        ml = dmin * (sb >> 4).to(tl.float32)
        j = i % 128
        qb = tl.load(raw_ptr + base + 16 + (i // 128) * 32 + j % 32, mask=bm, other=0).to(tl.int32)
        q = ((qb >> ((j // 32) * 2)) & 3).to(tl.float32)
        tl.store(out_ptr + blk.to(tl.int64) * 256 + i, dl * q - ml, mask=bm)

    @lazy_jit
    def _q3_k_kernel(raw_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
        """Q3_K, 110 bytes: hmask[32] (bit 2 of q: element i at bit i // 32 of byte i % 32), qs[64] (low 2 bits,
        planes as Q2_K), scales[12] (6-bit sc + 32: low nibble of sc[k] at byte k % 8, shift 4·(k // 8); top 2
        bits at byte 8 + k % 4, shift 2·(k // 4)), d. value (d·sc)·(q − 4)."""
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
        k = tl.arange(0, 16)[None, :, None]
        i = k * 16 + tl.arange(0, 16)[None, None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * 110
        lo = tl.load(raw_ptr + base + 108, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 109, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        sl = tl.load(raw_ptr + base + 96 + k % 8, mask=bm, other=0).to(tl.int32)
        sh = tl.load(raw_ptr + base + 104 + k % 4, mask=bm, other=0).to(tl.int32)
        sc = ((sl >> ((k // 8) * 4)) & 0xF) | (((sh >> ((k // 4) * 2)) & 3) << 4)
        dl = d * (sc - 32).to(tl.float32)
        hm = tl.load(raw_ptr + base + i % 32, mask=bm, other=0).to(tl.int32)
        j = i % 128
        qb = tl.load(raw_ptr + base + 32 + (i // 128) * 32 + j % 32, mask=bm, other=0).to(tl.int32)
        q = ((qb >> ((j // 32) * 2)) & 3) | (((hm >> (i // 32)) & 1) << 2)
        tl.store(out_ptr + blk.to(tl.int64) * 256 + i, dl * (q - 4).to(tl.float32), mask=bm)

    @lazy_jit
    def _q45_k_kernel(
        raw_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr, HIGH_BIT: tl.constexpr, TS: tl.constexpr, QS: tl.constexpr
    ):
        """Q4_K (144 bytes: d, dmin, scales[12], qs[128]) and Q5_K (176: d, dmin, scales[12], qh[32], qs[128]).
        qs: nibble planes in runs of 32 bytes (element 64r + 32s + j at shift 4s of byte 32r + j); qh: bit 4 of
        element i at bit i // 32 of byte i % 32. 6-bit sc/m per 32 values, sub-block k: k < 4 in the low 6 bits of
        bytes k / 4 + k; k ≥ 4 low nibble (sc) / high nibble (m) of byte 8 + k − 4 and the top 2 bits of bytes
        k − 4 / k. value (d·sc)·q − (dmin·m)."""
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
        k = tl.arange(0, 8)[None, :, None]
        j = tl.arange(0, 32)[None, None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * TS
        lo = tl.load(raw_ptr + base, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 1, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        lo = tl.load(raw_ptr + base + 2, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 3, mask=bm, other=0).to(tl.uint16)
        dmin = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        kk = k % 4
        b_sc = tl.load(raw_ptr + base + 4 + kk, mask=bm, other=0).to(tl.int32)
        b_m = tl.load(raw_ptr + base + 8 + kk, mask=bm, other=0).to(tl.int32)
        b_hi = tl.load(raw_ptr + base + 12 + kk, mask=bm, other=0).to(tl.int32)
        low = k < 4
        sc = tl.where(low, b_sc & 0x3F, (b_hi & 0xF) | ((b_sc >> 6) << 4))
        m = tl.where(low, b_m & 0x3F, (b_hi >> 4) | ((b_m >> 6) << 4))
        dl = d * sc.to(tl.float32)
        ml = dmin * m.to(tl.float32)
        qb = tl.load(raw_ptr + base + QS + (k // 2) * 32 + j, mask=bm, other=0).to(tl.int32)
        q = (qb >> ((k % 2) * 4)) & 0xF
        if HIGH_BIT:
            hb = tl.load(raw_ptr + base + 16 + j, mask=bm, other=0).to(tl.int32)
            q = q | (((hb >> k) & 1) << 4)
        tl.store(out_ptr + blk.to(tl.int64) * 256 + k * 32 + j, dl * q.to(tl.float32) - ml, mask=bm)

    @lazy_jit
    def _q6_k_kernel(raw_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
        """Q6_K, 210 bytes: ql[128] (low nibbles in runs of 64 bytes: element 128r + 64s + j at shift 4s of byte
        64r + j), qh[64] (top 2 bits, planes in runs of 32 as Q2_K), scales int8[16] (one per 16 values), d.
        value (d·sc)·(q − 32)."""
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
        k = tl.arange(0, 16)[None, :, None]
        i = k * 16 + tl.arange(0, 16)[None, None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * 210
        lo = tl.load(raw_ptr + base + 208, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 209, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        sc = tl.load(raw_ptr + base + 192 + k, mask=bm, other=0).to(tl.int8, bitcast=True)
        dl = d * sc.to(tl.float32)
        r = i // 128
        j = i % 128
        lb = tl.load(raw_ptr + base + r * 64 + j % 64, mask=bm, other=0).to(tl.int32)
        hb = tl.load(raw_ptr + base + 128 + r * 32 + j % 32, mask=bm, other=0).to(tl.int32)
        q = ((lb >> ((j // 64) * 4)) & 0xF) | (((hb >> ((j // 32) * 2)) & 3) << 4)
        tl.store(out_ptr + blk.to(tl.int64) * 256 + i, dl * (q - 32).to(tl.float32), mask=bm)

    @lazy_jit
    def _iq4_xs_kernel(raw_ptr, tab_ptr, out_ptr, n_blocks, BLOCK_B: tl.constexpr):
        """IQ4_XS, 136 bytes: d, scales_h (LE u16: top 2 bits of sc[k] at bit 2k), scales_l[4] (low nibble of
        sc[k] at byte k // 2, shift 4·(k % 2)), qs[128] (nibbles in runs of 16 bytes: element 32r + 16s + j at
        shift 4s of byte 16r + j). 6-bit sc per 32 values; value (d·(sc − 32))·kvalues[q]."""
        blk = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None, None]
        k = tl.arange(0, 8)[None, :, None]
        j = tl.arange(0, 32)[None, None, :]
        bm = blk < n_blocks
        base = blk.to(tl.int64) * 136
        lo = tl.load(raw_ptr + base, mask=bm, other=0).to(tl.uint16)
        hi = tl.load(raw_ptr + base + 1, mask=bm, other=0).to(tl.uint16)
        d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
        sh = tl.load(raw_ptr + base + 2 + k // 4, mask=bm, other=0).to(tl.int32)
        sl = tl.load(raw_ptr + base + 4 + k // 2, mask=bm, other=0).to(tl.int32)
        sc = ((sl >> ((k % 2) * 4)) & 0xF) | (((sh >> ((k % 4) * 2)) & 3) << 4)
        dl = d * (sc - 32).to(tl.float32)
        qb = tl.load(raw_ptr + base + 8 + k * 16 + j % 16, mask=bm, other=0).to(tl.int32)
        v = tl.load(tab_ptr + ((qb >> ((j // 16) * 4)) & 0xF))
        tl.store(out_ptr + blk.to(tl.int64) * 256 + k * 32 + j, dl * v, mask=bm)


T = GGMLType

# type → (kernel, codebook or None, constexpr flags); the launch adds the block count and BLOCK_B.
_KERNELS = {
    T.Q8_0: (lambda: _q8_0_kernel, None, {}),
    T.Q4_0: (lambda: _q4_0_kernel, KVALUES_IQ4NL, {"CODEBOOK": False}),
    T.IQ4_NL: (lambda: _q4_0_kernel, KVALUES_IQ4NL, {"CODEBOOK": True}),
    T.Q4_1: (lambda: _q4_1_kernel, None, {}),
    T.Q5_0: (lambda: _q5_kernel, None, {"AFFINE": False, "TS": 22, "QH": 2}),
    T.Q5_1: (lambda: _q5_kernel, None, {"AFFINE": True, "TS": 24, "QH": 4}),
    T.MXFP4: (lambda: _mxfp4_kernel, KVALUES_MXFP4, {}),
    T.Q2_K: (lambda: _q2_k_kernel, None, {}),
    T.Q3_K: (lambda: _q3_k_kernel, None, {}),
    T.Q4_K: (lambda: _q45_k_kernel, None, {"HIGH_BIT": False, "TS": 144, "QS": 16}),
    T.Q5_K: (lambda: _q45_k_kernel, None, {"HIGH_BIT": True, "TS": 176, "QS": 48}),
    T.Q6_K: (lambda: _q6_k_kernel, None, {}),
    T.IQ4_XS: (lambda: _iq4_xs_kernel, KVALUES_IQ4NL, {}),
}
KERNEL_TYPES: frozenset[GGMLType] = frozenset(_KERNELS)

# Blocks per program (by block size): 4096 values for the 32-element types, 2048 for the super-block types. The
# interpreter pays per program, not per element, so it gets tiles of 128 K values.
DEFAULT_BLOCK_B = {32: 128, 256: 8}
INTERPRET_BLOCK_B = {32: 4096, 256: 512}


@functools.lru_cache(maxsize=16)
def _table(values: tuple, device: torch.device) -> torch.Tensor:
    """A codebook on ``device``, made once: built per call, its host → device copy cost more than a 4096 × 14336
    dequantization's whole difference from the table-free types (~40 µs on an H100)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def dequant_triton(
    raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...], block_b: int | None = None
) -> torch.Tensor:
    """Triton kernel, same contract as ``dequant_reference`` (CUDA tensors, or CPU under TRITON_INTERPRET=1).

    ``block_b`` (a power of two) overrides the blocks per program; tests use it to cover partial last programs.
    """
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install 'qconv[gpu]')")
    t = GGMLType(ggml_type)
    if t not in _KERNELS:
        raise NotImplementedError(f"no Triton dequantization kernel for GGML type {t.name}")
    n = math.prod(shape)
    qk, size = BLOCK_SIZE[t], TYPE_SIZE[t]
    if raw.dtype != torch.uint8 or raw.dim() not in (1, 2):
        raise ValueError(f"expected 1-D or 2-D uint8 bytes, got {raw.dtype} {list(raw.shape)}")
    if n % qk or raw.numel() != n // qk * size:
        raise ValueError(
            f"{t.name}: {n} elements need a multiple of {qk} elements stored in {n // qk * size} bytes, "
            f"got {raw.numel()} bytes"
        )
    out = torch.empty(shape, dtype=torch.float32, device=raw.device)
    n_blocks = n // qk
    if n_blocks == 0:
        return out
    kernel, table, flags = _KERNELS[t]
    bb = block_b or (INTERPRET_BLOCK_B if interpret_mode() else DEFAULT_BLOCK_B)[qk]
    args = [raw.contiguous().reshape(-1)]
    if table is not None:
        args.append(_table(table, raw.device))
    kernel()[(triton.cdiv(n_blocks, bb),)](*args, out, n_blocks, BLOCK_B=bb, **flags, enable_fp_fusion=False)
    return out

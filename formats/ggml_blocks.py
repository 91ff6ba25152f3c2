"""Bit-exact GGML block layouts as pure, vectorized torch functions.

A quantized GGML tensor is a sequence of fixed-size blocks (``BLOCK_SIZE[t]`` elements stored in ``TYPE_SIZE[t]``
bytes). For every supported block type this module provides

* ``<T>Fields``: a frozen dataclass with the exact stored components of a batch of ``nb`` blocks. Quantized values
  are in *natural element order* (``q[b, i]`` is element ``i`` of block ``b``), so callers never see ggml's nibble
  splits, bit planes or 6-bit scale packing;
* ``pack_<t>(fields) -> uint8 [nb, TYPE_SIZE]`` and ``unpack_<t>(raw) -> fields``, exact inverses;
* ``dequantize_<t>(fields) -> float32 [nb, BLOCK_SIZE]``;

and the generic ``pack`` / ``unpack`` / ``dequantize_blocks`` / ``dequantize`` that dispatch on the type.

Every supported layout uses all of its bits (no padding, no ignored bits), so ``unpack`` is a bijection and
``pack(unpack(raw)) == raw`` holds for arbitrary bytes, NaN payloads in fp16 scales included: scales are moved as
raw bits and only converted to float32 inside the dequantizers.

Dequantization reproduces ggml's float32 arithmetic (as mirrored by ``gguf.quants.dequantize``) bit for bit: fp16
scales are widened to float32 first, K-quant sub-block scales are formed as ``d * sc`` in float32 and only then
multiplied by the quant, and affine types compute ``(d * q) + m`` as two roundings (never a fused multiply-add).

GGUF is little-endian and the dtype views used here follow host byte order, so a little-endian host is assumed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import ClassVar, NamedTuple

import torch


class GGMLType(IntEnum):
    """llama.cpp's ``ggml_type`` ids (the values stored in GGUF tensor infos)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


QK_K = 256

# (elements per block, bytes per block), from the block structs in ggml-common.h.
_SIZES: Mapping[GGMLType, tuple[int, int]] = MappingProxyType(
    {
        GGMLType.F32: (1, 4),
        GGMLType.F16: (1, 2),
        GGMLType.Q4_0: (32, 2 + 16),
        GGMLType.Q4_1: (32, 2 + 2 + 16),
        GGMLType.Q5_0: (32, 2 + 4 + 16),
        GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
        GGMLType.Q8_0: (32, 2 + 32),
        # block_q8_1 is {fp16 d, fp16 s, int8 qs[32]} = 36 bytes in ggml; gguf-py still lists the pre-2024 float
        # layout (40). Q8_1 only exists as a dot-product intermediate and never appears in GGUF files.
        GGMLType.Q8_1: (32, 2 + 2 + 32),
        GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
        GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
        GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
        GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
        GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
        GGMLType.Q8_K: (QK_K, 4 + QK_K + 2 * (QK_K // 16)),
        GGMLType.IQ2_XXS: (QK_K, 2 + QK_K // 4),
        GGMLType.IQ2_XS: (QK_K, 2 + QK_K // 4 + QK_K // 32),
        GGMLType.IQ3_XXS: (QK_K, 2 + 3 * QK_K // 8),
        GGMLType.IQ1_S: (QK_K, 2 + QK_K // 8 + QK_K // 16),
        GGMLType.IQ4_NL: (32, 2 + 16),
        GGMLType.IQ3_S: (QK_K, 2 + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64),
        GGMLType.IQ2_S: (QK_K, 2 + QK_K // 4 + QK_K // 16),
        GGMLType.IQ4_XS: (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
        GGMLType.I8: (1, 1),
        GGMLType.I16: (1, 2),
        GGMLType.I32: (1, 4),
        GGMLType.I64: (1, 8),
        GGMLType.F64: (1, 8),
        GGMLType.IQ1_M: (QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
        GGMLType.BF16: (1, 2),
        GGMLType.TQ1_0: (QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2),
        GGMLType.TQ2_0: (QK_K, QK_K // 4 + 2),
        GGMLType.MXFP4: (32, 1 + 16),
        GGMLType.NVFP4: (64, 4 + 32),
        GGMLType.Q1_0: (128, 2 + 16),
    }
)
BLOCK_SIZE: Mapping[GGMLType, int] = MappingProxyType({t: s[0] for t, s in _SIZES.items()})
TYPE_SIZE: Mapping[GGMLType, int] = MappingProxyType({t: s[1] for t, s in _SIZES.items()})
# The float types whose stored bits are a torch dtype's as they are.
FLOAT_DTYPES: Mapping[GGMLType, torch.dtype] = MappingProxyType(
    {GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16}
)

# Non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS (kvalues_iq4nl in ggml-common.h).
KVALUES_IQ4NL: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# E2M1 code -> value *doubled*, so every entry is an integer; ggml pairs it with half the E8M0 scale.
KVALUES_MXFP4: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


# --------------------------------------------------------------------------------------------------------------------
# Byte / bit helpers
# --------------------------------------------------------------------------------------------------------------------


def _as_blocks(raw: torch.Tensor, ggml_type: GGMLType) -> torch.Tensor:
    """Validate ``raw`` as uint8 [nb, TYPE_SIZE] and return it contiguous (dtype views need that)."""
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != TYPE_SIZE[ggml_type]:
        raise ValueError(
            f"{ggml_type.name}: expected uint8 [n_blocks, {TYPE_SIZE[ggml_type]}], got {raw.dtype} {list(raw.shape)}"
        )
    return _aligned(raw)


def _aligned(raw: torch.Tensor) -> torch.Tensor:
    """Contiguous copy-if-needed whose storage offset allows dtype views up to 8 bytes wide."""
    raw = raw.contiguous()
    return raw if raw.storage_offset() % 8 == 0 else raw.clone()


def _split_bytes(raw: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """Cut uint8 [nb, sum(sizes)] into contiguous column groups [nb, size_i], in struct member order."""
    assert raw.shape[1] == sum(sizes)
    return [part.contiguous() for part in torch.split(raw, list(sizes), dim=1)]


def _bytes_to(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 [nb, k * itemsize] as ``dtype`` [nb, k] (little-endian), without converting values."""
    return b.contiguous().view(dtype)


def _to_bytes(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret a [nb] or [nb, k] tensor as its uint8 bytes [nb, k * itemsize]."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], math.prod(t.shape[1:]) * t.element_size())


def _word_view(t: torch.Tensor, group: int) -> torch.Tensor | None:
    """uint8 [nb, k] as int64 words [nb, k / 8], when runs of ``group`` bytes are whole words and t can be viewed so."""
    if group % 8 or t.shape[1] % 8:
        return None
    t = t.contiguous()
    if t.data_ptr() % 8:
        return None
    return t.reshape(-1).view(torch.int64).reshape(t.shape[0], t.shape[1] // 8)


def _byte_mask(bits: int, width: int) -> int:
    """The ``bits``-wide low mask repeated in each byte of a ``width``-byte integer (int64's as a signed value)."""
    m = int.from_bytes(bytes([(1 << bits) - 1]) * width, "little")
    return m - (1 << 64) if width == 8 and m >= 1 << 63 else m


def _unpack_planes(b: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Unpack ggml's bit-plane interleaving: uint8 [nb, n_bytes] -> uint8 [nb, n_bytes * 8 // bits].

    ggml stores runs of ``group`` consecutive bytes; within a run, the ``bits``-wide field at shift ``s * bits`` of
    byte ``j`` holds element ``s * group + j`` of that run's ``group * 8 // bits`` elements. This one rule covers
    the nibble split of Q4_0 (group 16), Q4_K (32) and Q6_K (64), the 2-bit planes of Q2_K/Q3_K/Q6_K, the high-bit
    masks of Q3_K/Q5_K (group 32), Q5_0's qh and IQ4_XS's scale words (group 1: plain LSB-first packing).
    """
    nb, n_bytes = b.shape
    per_byte = 8 // bits
    # Where runs are whole int64 words, eight bytes go per op: a shift moves every byte's field down alike and the
    # byte-replicated mask drops what crossed in from the byte above (sign bits included). One shift-and-mask per
    # plane, then one concatenation: a single broadcast shift over all planes is 1.2–4× slower in torch (CPU).
    v, width = _word_view(b, group), 8
    if v is None:
        v, width = b, 1
    v = v.reshape(nb, n_bytes // group, 1, group // width)
    mask = _byte_mask(bits, width)
    planes = [(v >> (s * bits) if s else v) & mask for s in range(per_byte)]
    return torch.cat(planes, dim=2).view(torch.uint8).reshape(nb, n_bytes * per_byte)


def _pack_planes(q: torch.Tensor, group: int, bits: int) -> torch.Tensor:
    """Inverse of ``_unpack_planes``: values uint8 [nb, n] each < 2**bits -> uint8 [nb, n * bits // 8]."""
    nb, n = q.shape
    per_byte = 8 // bits
    q = q.to(torch.uint8)
    # Every value is below 2**bits: shifting a byte, or a word of eight, left by p·bits never carries across bytes.
    v, width = _word_view(q, group), 8
    if v is None:
        v, width = q, 1
    planes = v.reshape(nb, n // (per_byte * group), per_byte, group // width)
    packed = planes[:, :, 0].clone()
    for p in range(1, per_byte):  # disjoint bit ranges of each byte: OR the shifted planes in
        packed |= planes[:, :, p] << (p * bits)
    return packed.view(torch.uint8).reshape(nb, n // per_byte)


def _unpack_k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12-byte scale block: uint8 [nb, 12] -> (sc, m) uint8 [nb, 8] each, values 0..63.

    Bytes 0-3 hold sc[0:4] in their low 6 bits and the top 2 bits of sc[4:8] above; bytes 4-7 do the same for m;
    bytes 8-11 hold the low nibbles of sc[4:8] (low half) and m[4:8] (high half).
    """
    lo, mid, hi = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 6) << 4)], dim=1)
    m = torch.cat([mid & 0x3F, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, m


def _pack_k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_unpack_k_scales``: (sc, m) uint8 [nb, 8] in 0..63 -> uint8 [nb, 12]."""
    lo = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    mid = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    hi = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def _split_5bit(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [..] 0..31 -> (low nibble, high bit)."""
    return q & 0x0F, q >> 4


# --------------------------------------------------------------------------------------------------------------------
# Field validation (pack refuses values that would bleed into neighbouring bits)
# --------------------------------------------------------------------------------------------------------------------


def _check_scale(name: str, t: torch.Tensor, dtype: torch.dtype = torch.float16) -> int:
    """Check a per-block scale is ``dtype`` [nb]; returns nb."""
    if t.dtype != dtype or t.dim() != 1:
        raise ValueError(f"field {name}: expected {dtype} [n_blocks], got {t.dtype} {list(t.shape)}")
    return t.shape[0]


def _check_ints(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int], lo: int, hi: int) -> None:
    """Check an integer field has the given dtype/shape and every value lies in [lo, hi]."""
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"field {name}: expected {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
    info = torch.iinfo(dtype)
    if t.numel() and (info.min < lo or info.max > hi):  # a dtype that cannot leave [lo, hi] needs no pass over t
        tmin, tmax = (int(v) for v in torch.aminmax(t))
        if tmin < lo or tmax > hi:
            raise ValueError(f"field {name}: values must lie in [{lo}, {hi}], got [{tmin}, {tmax}]")


def _f16_to_f32(h: torch.Tensor) -> torch.Tensor:
    """float16 [...] -> float32 [...], keeping NaN payloads bit for bit.

    torch's cast quiets signalling NaNs (sets the top mantissa bit); numpy's, which gguf-py uses, only shifts the
    payload. Every non-NaN value widens exactly, so only NaN lanes are rebuilt from the bits.
    """
    out = h.to(torch.float32)
    # The common case, no NaN: the plain cast is exact. (NaN-free float32 sums are never NaN: checked in one pass
    # over the float32 copy, several times cheaper than isnan on float16; an inf − inf sum only costs the slow path.)
    if not bool(torch.isnan(out.sum())):
        return out
    bits = h.view(torch.int16).to(torch.int32) & 0xFFFF
    is_nan = ((bits & 0x7C00) == 0x7C00) & ((bits & 0x03FF) != 0)
    nan_bits = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x03FF) << 13)
    return torch.where(is_nan, nan_bits, h.to(torch.float32).view(torch.int32)).view(torch.float32)


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, but when both are NaN return a's NaN, as numpy (hence gguf-py) does on x86.

    IEEE 754 leaves the choice of NaN payload open and torch's vectorized CPU kernels propagate b's; fixing the
    choice keeps dequantization bit-exact even for blocks whose scale and min fields are both NaN.
    """
    nan = torch.isnan(a)
    return torch.where(nan, a, a + b) if bool(nan.any()) else a + b


def _sub(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b with ``_add``'s NaN choice."""
    nan = torch.isnan(a)
    return torch.where(nan, a, a - b) if bool(nan.any()) else a - b


def _affine(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, sign: float) -> torch.Tensor:
    """scale·q + sign·offset (float32, broadcasting), rounded as gguf-py rounds it. ``q`` is a fresh float32 tensor
    and is consumed. With finite per-block scales and offsets (the small tensors) no product can be NaN, so the
    result is computed in place; otherwise through ``_add``/``_sub`` for their NaN payload choice."""
    if bool(torch.isfinite(scale).all()) and bool(torch.isfinite(offset).all()):
        return q.mul_(scale).add_(offset, alpha=sign)
    return _add(scale * q, offset) if sign > 0 else _sub(scale * q, offset)


def _f32(t: torch.Tensor) -> torch.Tensor:
    """Widen a field to float32 (exact for every stored dtype)."""
    return _f16_to_f32(t) if t.dtype == torch.float16 else t.to(torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Field containers
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BlockFields:
    """Base of the per-type field containers: ``ggml_type`` names the layout, ``n_blocks`` the batch size.

    Containers compare by identity (``eq=False``): tensor equality has no single truth value.
    """

    ggml_type: ClassVar[GGMLType]

    @property
    def n_blocks(self) -> int:
        return getattr(self, dataclasses.fields(self)[0].name).shape[0]


def slice_blocks(fields: BlockFields, b0: int, b1: int) -> BlockFields:
    """Blocks b0 … b1 − 1 of ``fields`` (views): with n/BLOCK_SIZE blocks per row, a range of whole rows."""
    cls = type(fields)
    return cls(**{f.name: getattr(fields, f.name)[b0:b1] for f in dataclasses.fields(cls)})


@dataclass(frozen=True, eq=False)
class Q4_0Fields(BlockFields):
    """d float16 [nb]; q uint8 [nb, 32] in 0..15. value = d * (q - 8)."""

    ggml_type: ClassVar[GGMLType] = GGMLType.Q4_0
    d: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q4_1Fields(BlockFields):
    """d, m float16 [nb]; q uint8 [nb, 32] in 0..15. value = d * q + m."""

    ggml_type: ClassVar[GGMLType] = GGMLType.Q4_1
    d: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q5_0Fields(BlockFields):
    """d float16 [nb]; q uint8 [nb, 32] in 0..31. value = d * (q - 16)."""

    ggml_type: ClassVar[GGMLType] = GGMLType.Q5_0
    d: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q5_1Fields(BlockFields):
    """d, m float16 [nb]; q uint8 [nb, 32] in 0..31. value = d * q + m."""

    ggml_type: ClassVar[GGMLType] = GGMLType.Q5_1
    d: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q8_0Fields(BlockFields):
    """d float16 [nb]; q int8 [nb, 32]. value = d * q."""

    ggml_type: ClassVar[GGMLType] = GGMLType.Q8_0
    d: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q2_KFields(BlockFields):
    """d, dmin float16 [nb]; sc, m uint8 [nb, 16] in 0..15 (one per 16 elements); q uint8 [nb, 256] in 0..3.

    value = (d * sc) * q - (dmin * m).
    """

    ggml_type: ClassVar[GGMLType] = GGMLType.Q2_K
    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q3_KFields(BlockFields):
    """d float16 [nb]; sc int8 [nb, 16] in -32..31 (one per 16 elements); q uint8 [nb, 256] in 0..7.

    value = (d * sc) * (q - 4). ggml stores sc + 32 in 6 bits, and q - 4 as 2 low bits plus an *inverted*
    high-bit mask (mask bit set means no -4 offset), which is exactly bit 2 of q.
    """

    ggml_type: ClassVar[GGMLType] = GGMLType.Q3_K
    d: torch.Tensor
    sc: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q4_KFields(BlockFields):
    """d, dmin float16 [nb]; sc, m uint8 [nb, 8] in 0..63 (one per 32 elements); q uint8 [nb, 256] in 0..15.

    value = (d * sc) * q - (dmin * m).
    """

    ggml_type: ClassVar[GGMLType] = GGMLType.Q4_K
    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q5_KFields(BlockFields):
    """As Q4_KFields with q in 0..31."""

    ggml_type: ClassVar[GGMLType] = GGMLType.Q5_K
    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q6_KFields(BlockFields):
    """d float16 [nb]; sc int8 [nb, 16] (one per 16 elements, full int8 range); q uint8 [nb, 256] in 0..63.

    value = (d * sc) * (q - 32).
    """

    ggml_type: ClassVar[GGMLType] = GGMLType.Q6_K
    d: torch.Tensor
    sc: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class Q8_KFields(BlockFields):
    """d float32 [nb]; q int8 [nb, 256]; bsums int16 [nb, 16]. value = d * q.

    bsums (sums of q over each 16 elements) are redundant: ggml fills them when quantizing and only its dot
    products read them. They are stored verbatim so the layout stays a bijection; pack does not check them.
    """

    ggml_type: ClassVar[GGMLType] = GGMLType.Q8_K
    d: torch.Tensor
    q: torch.Tensor
    bsums: torch.Tensor


@dataclass(frozen=True, eq=False)
class IQ4_NLFields(BlockFields):
    """d float16 [nb]; q uint8 [nb, 32] in 0..15, indices into KVALUES_IQ4NL. value = d * KVALUES_IQ4NL[q]."""

    ggml_type: ClassVar[GGMLType] = GGMLType.IQ4_NL
    d: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class IQ4_XSFields(BlockFields):
    """d float16 [nb]; sc uint8 [nb, 8] in 0..63 (one per 32 elements); q uint8 [nb, 256] in 0..15.

    value = (d * (sc - 32)) * KVALUES_IQ4NL[q].
    """

    ggml_type: ClassVar[GGMLType] = GGMLType.IQ4_XS
    d: torch.Tensor
    sc: torch.Tensor
    q: torch.Tensor


@dataclass(frozen=True, eq=False)
class MXFP4Fields(BlockFields):
    """e uint8 [nb] (E8M0 exponent); q uint8 [nb, 32] in 0..15 (E2M1 codes: sign bit 3, then 2e1m magnitude).

    value = 2**(e - 127) * e2m1(q), computed as ggml does: half-scale(e) * KVALUES_MXFP4[q]. Like ggml, e = 255 is
    treated as an ordinary exponent (2**128), not as the OCP spec's NaN.
    """

    ggml_type: ClassVar[GGMLType] = GGMLType.MXFP4
    e: torch.Tensor
    q: torch.Tensor


# --------------------------------------------------------------------------------------------------------------------
# Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / IQ4_NL / MXFP4 (32-element blocks)
# --------------------------------------------------------------------------------------------------------------------


def pack_q4_0(f: Q4_0Fields) -> torch.Tensor:
    """Q4_0Fields -> uint8 [nb, 18]: d, qs[16] (element j in the low nibble of qs[j], j + 16 in the high)."""
    nb = _check_scale("d", f.d)
    _check_ints("q", f.q, torch.uint8, (nb, 32), 0, 15)
    return torch.cat([_to_bytes(f.d), _pack_planes(f.q, 16, 4)], dim=1)


def unpack_q4_0(raw: torch.Tensor) -> Q4_0Fields:
    """uint8 [nb, 18] -> Q4_0Fields."""
    d, qs = _split_bytes(_as_blocks(raw, GGMLType.Q4_0), (2, 16))
    return Q4_0Fields(d=_bytes_to(d, torch.float16).reshape(-1), q=_unpack_planes(qs, 16, 4))


def dequantize_q4_0(f: Q4_0Fields) -> torch.Tensor:
    """Q4_0Fields -> float32 [nb, 32]."""
    return _f32(f.d)[:, None] * _f32(f.q.to(torch.int16) - 8)


def pack_q4_1(f: Q4_1Fields) -> torch.Tensor:
    """Q4_1Fields -> uint8 [nb, 20]: d, m, qs[16] (nibble split as Q4_0)."""
    nb = _check_scale("d", f.d)
    _check_scale("m", f.m)
    _check_ints("q", f.q, torch.uint8, (nb, 32), 0, 15)
    return torch.cat([_to_bytes(f.d), _to_bytes(f.m), _pack_planes(f.q, 16, 4)], dim=1)


def unpack_q4_1(raw: torch.Tensor) -> Q4_1Fields:
    """uint8 [nb, 20] -> Q4_1Fields."""
    d, m, qs = _split_bytes(_as_blocks(raw, GGMLType.Q4_1), (2, 2, 16))
    return Q4_1Fields(
        d=_bytes_to(d, torch.float16).reshape(-1),
        m=_bytes_to(m, torch.float16).reshape(-1),
        q=_unpack_planes(qs, 16, 4),
    )


def dequantize_q4_1(f: Q4_1Fields) -> torch.Tensor:
    """Q4_1Fields -> float32 [nb, 32]."""
    return _affine(_f32(f.q), _f32(f.d)[:, None], _f32(f.m)[:, None], 1.0)


def pack_q5_0(f: Q5_0Fields) -> torch.Tensor:
    """Q5_0Fields -> uint8 [nb, 22]: d, qh[4] (bit j of the LE u32 = bit 4 of element j), qs[16] (low nibbles)."""
    nb = _check_scale("d", f.d)
    _check_ints("q", f.q, torch.uint8, (nb, 32), 0, 31)
    low, high = _split_5bit(f.q)
    return torch.cat([_to_bytes(f.d), _pack_planes(high, 1, 1), _pack_planes(low, 16, 4)], dim=1)


def unpack_q5_0(raw: torch.Tensor) -> Q5_0Fields:
    """uint8 [nb, 22] -> Q5_0Fields."""
    d, qh, qs = _split_bytes(_as_blocks(raw, GGMLType.Q5_0), (2, 4, 16))
    q = _unpack_planes(qs, 16, 4) | (_unpack_planes(qh, 1, 1) << 4)
    return Q5_0Fields(d=_bytes_to(d, torch.float16).reshape(-1), q=q)


def dequantize_q5_0(f: Q5_0Fields) -> torch.Tensor:
    """Q5_0Fields -> float32 [nb, 32]."""
    return _f32(f.d)[:, None] * _f32(f.q.to(torch.int16) - 16)


def pack_q5_1(f: Q5_1Fields) -> torch.Tensor:
    """Q5_1Fields -> uint8 [nb, 24]: d, m, qh[4], qs[16] (bit placement as Q5_0)."""
    nb = _check_scale("d", f.d)
    _check_scale("m", f.m)
    _check_ints("q", f.q, torch.uint8, (nb, 32), 0, 31)
    low, high = _split_5bit(f.q)
    return torch.cat([_to_bytes(f.d), _to_bytes(f.m), _pack_planes(high, 1, 1), _pack_planes(low, 16, 4)], dim=1)


def unpack_q5_1(raw: torch.Tensor) -> Q5_1Fields:
    """uint8 [nb, 24] -> Q5_1Fields."""
    d, m, qh, qs = _split_bytes(_as_blocks(raw, GGMLType.Q5_1), (2, 2, 4, 16))
    q = _unpack_planes(qs, 16, 4) | (_unpack_planes(qh, 1, 1) << 4)
    return Q5_1Fields(d=_bytes_to(d, torch.float16).reshape(-1), m=_bytes_to(m, torch.float16).reshape(-1), q=q)


def dequantize_q5_1(f: Q5_1Fields) -> torch.Tensor:
    """Q5_1Fields -> float32 [nb, 32]."""
    return _affine(_f32(f.q), _f32(f.d)[:, None], _f32(f.m)[:, None], 1.0)


def pack_q8_0(f: Q8_0Fields) -> torch.Tensor:
    """Q8_0Fields -> uint8 [nb, 34]: d, qs[32] as int8."""
    nb = _check_scale("d", f.d)
    _check_ints("q", f.q, torch.int8, (nb, 32), -128, 127)
    return torch.cat([_to_bytes(f.d), _to_bytes(f.q)], dim=1)


def unpack_q8_0(raw: torch.Tensor) -> Q8_0Fields:
    """uint8 [nb, 34] -> Q8_0Fields."""
    d, qs = _split_bytes(_as_blocks(raw, GGMLType.Q8_0), (2, 32))
    return Q8_0Fields(d=_bytes_to(d, torch.float16).reshape(-1), q=_bytes_to(qs, torch.int8))


def dequantize_q8_0(f: Q8_0Fields) -> torch.Tensor:
    """Q8_0Fields -> float32 [nb, 32]."""
    return _f32(f.q).mul_(_f32(f.d)[:, None])


def pack_iq4_nl(f: IQ4_NLFields) -> torch.Tensor:
    """IQ4_NLFields -> uint8 [nb, 18]: d, qs[16] (nibble split as Q4_0)."""
    nb = _check_scale("d", f.d)
    _check_ints("q", f.q, torch.uint8, (nb, 32), 0, 15)
    return torch.cat([_to_bytes(f.d), _pack_planes(f.q, 16, 4)], dim=1)


def unpack_iq4_nl(raw: torch.Tensor) -> IQ4_NLFields:
    """uint8 [nb, 18] -> IQ4_NLFields."""
    d, qs = _split_bytes(_as_blocks(raw, GGMLType.IQ4_NL), (2, 16))
    return IQ4_NLFields(d=_bytes_to(d, torch.float16).reshape(-1), q=_unpack_planes(qs, 16, 4))


def _codebook(values: tuple[int, ...], idx: torch.Tensor) -> torch.Tensor:
    """Look up float32 codebook entries for uint8 indices of any shape."""
    table = torch.tensor(values, dtype=torch.float32, device=idx.device)
    return table[idx.long()]


def dequantize_iq4_nl(f: IQ4_NLFields) -> torch.Tensor:
    """IQ4_NLFields -> float32 [nb, 32]."""
    return _f32(f.d)[:, None] * _codebook(KVALUES_IQ4NL, f.q)


def pack_mxfp4(f: MXFP4Fields) -> torch.Tensor:
    """MXFP4Fields -> uint8 [nb, 17]: e, qs[16] (nibble split as Q4_0)."""
    nb = _check_scale("e", f.e, torch.uint8)
    _check_ints("q", f.q, torch.uint8, (nb, 32), 0, 15)
    return torch.cat([f.e.reshape(nb, 1), _pack_planes(f.q, 16, 4)], dim=1)


def unpack_mxfp4(raw: torch.Tensor) -> MXFP4Fields:
    """uint8 [nb, 17] -> MXFP4Fields."""
    e, qs = _split_bytes(_as_blocks(raw, GGMLType.MXFP4), (1, 16))
    return MXFP4Fields(e=e.reshape(-1), q=_unpack_planes(qs, 16, 4))


def e8m0_to_fp32_half(e: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 exponents [...] -> float32 2**(e - 128) (half the scale), bit-exact to ggml_e8m0_to_fp32_half.

    e < 2 would need an exponent field of 0, so those are built as subnormals.
    """
    e32 = e.to(torch.int32)
    subnormal = torch.bitwise_left_shift(torch.tensor(0x00200000, dtype=torch.int32, device=e.device), e32)
    return torch.where(e32 < 2, subnormal, (e32 - 1) << 23).view(torch.float32)


def dequantize_mxfp4(f: MXFP4Fields) -> torch.Tensor:
    """MXFP4Fields -> float32 [nb, 32]."""
    return e8m0_to_fp32_half(f.e)[:, None] * _codebook(KVALUES_MXFP4, f.q)


# --------------------------------------------------------------------------------------------------------------------
# K-quants and IQ4_XS (256-element super-blocks)
# --------------------------------------------------------------------------------------------------------------------


def _sub_blocks(q: torch.Tensor, n_sub: int) -> torch.Tensor:
    """float32 [nb, 256] -> [nb, n_sub, 256 // n_sub] so per-sub-block scales broadcast as [nb, n_sub, 1]."""
    return q.reshape(q.shape[0], n_sub, QK_K // n_sub)


def pack_q2_k(f: Q2_KFields) -> torch.Tensor:
    """Q2_KFields -> uint8 [nb, 84]: scales[16] (sc | m << 4), qs[64] (2-bit planes, runs of 32), d, dmin."""
    nb = _check_scale("d", f.d)
    _check_scale("dmin", f.dmin)
    _check_ints("sc", f.sc, torch.uint8, (nb, 16), 0, 15)
    _check_ints("m", f.m, torch.uint8, (nb, 16), 0, 15)
    _check_ints("q", f.q, torch.uint8, (nb, QK_K), 0, 3)
    scales = f.sc | (f.m << 4)
    return torch.cat([scales, _pack_planes(f.q, 32, 2), _to_bytes(f.d), _to_bytes(f.dmin)], dim=1)


def unpack_q2_k(raw: torch.Tensor) -> Q2_KFields:
    """uint8 [nb, 84] -> Q2_KFields."""
    scales, qs, d, dmin = _split_bytes(_as_blocks(raw, GGMLType.Q2_K), (16, 64, 2, 2))
    return Q2_KFields(
        d=_bytes_to(d, torch.float16).reshape(-1),
        dmin=_bytes_to(dmin, torch.float16).reshape(-1),
        sc=scales & 0x0F,
        m=scales >> 4,
        q=_unpack_planes(qs, 32, 2),
    )


def dequantize_q2_k(f: Q2_KFields) -> torch.Tensor:
    """Q2_KFields -> float32 [nb, 256]."""
    dl = (_f32(f.d)[:, None] * _f32(f.sc))[..., None]
    ml = (_f32(f.dmin)[:, None] * _f32(f.m))[..., None]
    return _affine(_sub_blocks(_f32(f.q), 16), dl, ml, -1.0).reshape(-1, QK_K)


def pack_q3_k(f: Q3_KFields) -> torch.Tensor:
    """Q3_KFields -> uint8 [nb, 110]: hmask[32], qs[64], scales[12], d.

    hmask holds bit 2 of q as 1-bit planes (runs of 32), qs the low 2 bits as 2-bit planes (runs of 32). The 6-bit
    biased scales sc + 32 keep their low nibbles in bytes 0-7 (sc[j] low, sc[j + 8] high) and their top 2 bits in
    bytes 8-11 (sc[j] at byte 8 + j % 4, shift 2 * (j // 4)).
    """
    nb = _check_scale("d", f.d)
    _check_ints("sc", f.sc, torch.int8, (nb, 16), -32, 31)
    _check_ints("q", f.q, torch.uint8, (nb, QK_K), 0, 7)
    biased = (f.sc.to(torch.int16) + 32).to(torch.uint8)
    scales = torch.cat([_pack_planes(biased & 0x0F, 8, 4), _pack_planes(biased >> 4, 4, 2)], dim=1)
    return torch.cat([_pack_planes(f.q >> 2, 32, 1), _pack_planes(f.q & 0x03, 32, 2), scales, _to_bytes(f.d)], dim=1)


def unpack_q3_k(raw: torch.Tensor) -> Q3_KFields:
    """uint8 [nb, 110] -> Q3_KFields."""
    hmask, qs, scales, d = _split_bytes(_as_blocks(raw, GGMLType.Q3_K), (32, 64, 12, 2))
    biased = _unpack_planes(scales[:, :8], 8, 4) | (_unpack_planes(scales[:, 8:], 4, 2) << 4)
    return Q3_KFields(
        d=_bytes_to(d, torch.float16).reshape(-1),
        sc=(biased.to(torch.int16) - 32).to(torch.int8),
        q=_unpack_planes(qs, 32, 2) | (_unpack_planes(hmask, 32, 1) << 2),
    )


def dequantize_q3_k(f: Q3_KFields) -> torch.Tensor:
    """Q3_KFields -> float32 [nb, 256]."""
    dl = (_f32(f.d)[:, None] * _f32(f.sc))[..., None]
    return (dl * _sub_blocks(_f32(f.q.to(torch.int16) - 4), 16)).reshape(-1, QK_K)


def _check_k_fields(f: Q4_KFields | Q5_KFields, q_max: int) -> int:
    nb = _check_scale("d", f.d)
    _check_scale("dmin", f.dmin)
    _check_ints("sc", f.sc, torch.uint8, (nb, 8), 0, 63)
    _check_ints("m", f.m, torch.uint8, (nb, 8), 0, 63)
    _check_ints("q", f.q, torch.uint8, (nb, QK_K), 0, q_max)
    return nb


def _dequantize_k_affine(f: Q4_KFields | Q5_KFields) -> torch.Tensor:
    dl = (_f32(f.d)[:, None] * _f32(f.sc))[..., None]
    ml = (_f32(f.dmin)[:, None] * _f32(f.m))[..., None]
    return _affine(_sub_blocks(_f32(f.q), 8), dl, ml, -1.0).reshape(-1, QK_K)


def pack_q4_k(f: Q4_KFields) -> torch.Tensor:
    """Q4_KFields -> uint8 [nb, 144]: d, dmin, scales[12] (see _unpack_k_scales), qs[128] (nibbles, runs of 32)."""
    _check_k_fields(f, 15)
    head = [_to_bytes(f.d), _to_bytes(f.dmin), _pack_k_scales(f.sc, f.m)]
    return torch.cat([*head, _pack_planes(f.q, 32, 4)], dim=1)


def unpack_q4_k(raw: torch.Tensor) -> Q4_KFields:
    """uint8 [nb, 144] -> Q4_KFields."""
    d, dmin, scales, qs = _split_bytes(_as_blocks(raw, GGMLType.Q4_K), (2, 2, 12, 128))
    sc, m = _unpack_k_scales(scales)
    return Q4_KFields(
        d=_bytes_to(d, torch.float16).reshape(-1),
        dmin=_bytes_to(dmin, torch.float16).reshape(-1),
        sc=sc,
        m=m,
        q=_unpack_planes(qs, 32, 4),
    )


def dequantize_q4_k(f: Q4_KFields) -> torch.Tensor:
    """Q4_KFields -> float32 [nb, 256]."""
    return _dequantize_k_affine(f)


def pack_q5_k(f: Q5_KFields) -> torch.Tensor:
    """Q5_KFields -> uint8 [nb, 176]: d, dmin, scales[12], qh[32] (bit 4 as 1-bit planes), qs[128] (as Q4_K)."""
    _check_k_fields(f, 31)
    low, high = _split_5bit(f.q)
    head = [_to_bytes(f.d), _to_bytes(f.dmin), _pack_k_scales(f.sc, f.m)]
    return torch.cat([*head, _pack_planes(high, 32, 1), _pack_planes(low, 32, 4)], dim=1)


def unpack_q5_k(raw: torch.Tensor) -> Q5_KFields:
    """uint8 [nb, 176] -> Q5_KFields."""
    d, dmin, scales, qh, qs = _split_bytes(_as_blocks(raw, GGMLType.Q5_K), (2, 2, 12, 32, 128))
    sc, m = _unpack_k_scales(scales)
    return Q5_KFields(
        d=_bytes_to(d, torch.float16).reshape(-1),
        dmin=_bytes_to(dmin, torch.float16).reshape(-1),
        sc=sc,
        m=m,
        q=_unpack_planes(qs, 32, 4) | (_unpack_planes(qh, 32, 1) << 4),
    )


def dequantize_q5_k(f: Q5_KFields) -> torch.Tensor:
    """Q5_KFields -> float32 [nb, 256]."""
    return _dequantize_k_affine(f)


def pack_q6_k(f: Q6_KFields) -> torch.Tensor:
    """Q6_KFields -> uint8 [nb, 210]: ql[128] (low nibbles, runs of 64), qh[64] (top 2 bits, runs of 32),
    scales[16] int8, d."""
    nb = _check_scale("d", f.d)
    _check_ints("sc", f.sc, torch.int8, (nb, 16), -128, 127)
    _check_ints("q", f.q, torch.uint8, (nb, QK_K), 0, 63)
    ql, qh = _pack_planes(f.q & 0x0F, 64, 4), _pack_planes(f.q >> 4, 32, 2)
    return torch.cat([ql, qh, _to_bytes(f.sc), _to_bytes(f.d)], dim=1)


def unpack_q6_k(raw: torch.Tensor) -> Q6_KFields:
    """uint8 [nb, 210] -> Q6_KFields."""
    ql, qh, scales, d = _split_bytes(_as_blocks(raw, GGMLType.Q6_K), (128, 64, 16, 2))
    return Q6_KFields(
        d=_bytes_to(d, torch.float16).reshape(-1),
        sc=_bytes_to(scales, torch.int8),
        q=_unpack_planes(ql, 64, 4) | (_unpack_planes(qh, 32, 2) << 4),
    )


def dequantize_q6_k(f: Q6_KFields) -> torch.Tensor:
    """Q6_KFields -> float32 [nb, 256]."""
    dl = (_f32(f.d)[:, None] * _f32(f.sc))[..., None]
    return _sub_blocks(f.q.to(torch.float32).sub_(32), 16).mul_(dl).reshape(-1, QK_K)


def pack_q8_k(f: Q8_KFields) -> torch.Tensor:
    """Q8_KFields -> uint8 [nb, 292]: d float32, qs[256] int8, bsums[16] int16."""
    nb = _check_scale("d", f.d, torch.float32)
    _check_ints("q", f.q, torch.int8, (nb, QK_K), -128, 127)
    _check_ints("bsums", f.bsums, torch.int16, (nb, 16), -(2**15), 2**15 - 1)
    return torch.cat([_to_bytes(f.d), _to_bytes(f.q), _to_bytes(f.bsums)], dim=1)


def unpack_q8_k(raw: torch.Tensor) -> Q8_KFields:
    """uint8 [nb, 292] -> Q8_KFields."""
    d, qs, bsums = _split_bytes(_as_blocks(raw, GGMLType.Q8_K), (4, QK_K, 32))
    return Q8_KFields(
        d=_bytes_to(d, torch.float32).reshape(-1), q=_bytes_to(qs, torch.int8), bsums=_bytes_to(bsums, torch.int16)
    )


def dequantize_q8_k(f: Q8_KFields) -> torch.Tensor:
    """Q8_KFields -> float32 [nb, 256] (dequantize_row_q8_K: d * q)."""
    return f.d[:, None] * _f32(f.q)


def pack_iq4_xs(f: IQ4_XSFields) -> torch.Tensor:
    """IQ4_XSFields -> uint8 [nb, 136]: d, scales_h (LE u16, top 2 bits of sc[i] at bit 2i),
    scales_l[4] (low nibble of sc[2k] low, sc[2k + 1] high), qs[128] (nibbles, runs of 16)."""
    nb = _check_scale("d", f.d)
    _check_ints("sc", f.sc, torch.uint8, (nb, 8), 0, 63)
    _check_ints("q", f.q, torch.uint8, (nb, QK_K), 0, 15)
    scales_h, scales_l = _pack_planes(f.sc >> 4, 1, 2), _pack_planes(f.sc & 0x0F, 1, 4)
    return torch.cat([_to_bytes(f.d), scales_h, scales_l, _pack_planes(f.q, 16, 4)], dim=1)


def unpack_iq4_xs(raw: torch.Tensor) -> IQ4_XSFields:
    """uint8 [nb, 136] -> IQ4_XSFields."""
    d, scales_h, scales_l, qs = _split_bytes(_as_blocks(raw, GGMLType.IQ4_XS), (2, 2, 4, 128))
    return IQ4_XSFields(
        d=_bytes_to(d, torch.float16).reshape(-1),
        sc=_unpack_planes(scales_l, 1, 4) | (_unpack_planes(scales_h, 1, 2) << 4),
        q=_unpack_planes(qs, 16, 4),
    )


def dequantize_iq4_xs(f: IQ4_XSFields) -> torch.Tensor:
    """IQ4_XSFields -> float32 [nb, 256]."""
    dl = (_f32(f.d)[:, None] * _f32(f.sc.to(torch.int16) - 32))[..., None]
    return (dl * _sub_blocks(_codebook(KVALUES_IQ4NL, f.q), 8)).reshape(-1, QK_K)


# --------------------------------------------------------------------------------------------------------------------
# Generic dispatch
# --------------------------------------------------------------------------------------------------------------------


class _Codec(NamedTuple):
    fields_type: type[BlockFields]
    pack: Callable[..., torch.Tensor]
    unpack: Callable[[torch.Tensor], BlockFields]
    dequantize: Callable[..., torch.Tensor]


_CODECS: Mapping[GGMLType, _Codec] = MappingProxyType(
    {
        GGMLType.Q4_0: _Codec(Q4_0Fields, pack_q4_0, unpack_q4_0, dequantize_q4_0),
        GGMLType.Q4_1: _Codec(Q4_1Fields, pack_q4_1, unpack_q4_1, dequantize_q4_1),
        GGMLType.Q5_0: _Codec(Q5_0Fields, pack_q5_0, unpack_q5_0, dequantize_q5_0),
        GGMLType.Q5_1: _Codec(Q5_1Fields, pack_q5_1, unpack_q5_1, dequantize_q5_1),
        GGMLType.Q8_0: _Codec(Q8_0Fields, pack_q8_0, unpack_q8_0, dequantize_q8_0),
        GGMLType.Q2_K: _Codec(Q2_KFields, pack_q2_k, unpack_q2_k, dequantize_q2_k),
        GGMLType.Q3_K: _Codec(Q3_KFields, pack_q3_k, unpack_q3_k, dequantize_q3_k),
        GGMLType.Q4_K: _Codec(Q4_KFields, pack_q4_k, unpack_q4_k, dequantize_q4_k),
        GGMLType.Q5_K: _Codec(Q5_KFields, pack_q5_k, unpack_q5_k, dequantize_q5_k),
        GGMLType.Q6_K: _Codec(Q6_KFields, pack_q6_k, unpack_q6_k, dequantize_q6_k),
        GGMLType.Q8_K: _Codec(Q8_KFields, pack_q8_k, unpack_q8_k, dequantize_q8_k),
        GGMLType.IQ4_NL: _Codec(IQ4_NLFields, pack_iq4_nl, unpack_iq4_nl, dequantize_iq4_nl),
        GGMLType.IQ4_XS: _Codec(IQ4_XSFields, pack_iq4_xs, unpack_iq4_xs, dequantize_iq4_xs),
        GGMLType.MXFP4: _Codec(MXFP4Fields, pack_mxfp4, unpack_mxfp4, dequantize_mxfp4),
    }
)


def _bf16_bits_to_f32(raw: torch.Tensor) -> torch.Tensor:
    # Shifting the bits (rather than a dtype cast) keeps NaN payloads exactly as ggml_bf16_to_fp32 does.
    return (raw.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# Element types with a one-element "block": raw bytes -> float32 [n].
_SCALAR_DECODERS: Mapping[GGMLType, Callable[[torch.Tensor], torch.Tensor]] = MappingProxyType(
    {
        GGMLType.F32: lambda raw: raw.view(torch.float32).clone(),
        GGMLType.F16: lambda raw: _f16_to_f32(raw.view(torch.float16)),
        GGMLType.BF16: _bf16_bits_to_f32,
        GGMLType.F64: lambda raw: raw.view(torch.float64).to(torch.float32),
        GGMLType.I8: lambda raw: raw.view(torch.int8).to(torch.float32),
        GGMLType.I16: lambda raw: raw.view(torch.int16).to(torch.float32),
        GGMLType.I32: lambda raw: raw.view(torch.int32).to(torch.float32),
        GGMLType.I64: lambda raw: raw.view(torch.int64).to(torch.float32),
    }
)

SUPPORTED_BLOCK_TYPES: frozenset[GGMLType] = frozenset(_CODECS)
SUPPORTED_DEQUANT_TYPES: frozenset[GGMLType] = frozenset(_CODECS) | frozenset(_SCALAR_DECODERS)


def _codec(ggml_type: int) -> _Codec:
    t = GGMLType(ggml_type)
    if t not in _CODECS:
        raise NotImplementedError(f"no block layout for GGML type {t.name}")
    return _CODECS[t]


def pack(fields: BlockFields) -> torch.Tensor:
    """Any ``<T>Fields`` -> uint8 [nb, TYPE_SIZE[T]]."""
    return _codec(fields.ggml_type).pack(fields)


def unpack(raw: torch.Tensor, ggml_type: int) -> BlockFields:
    """uint8 [nb, TYPE_SIZE[ggml_type]] -> the type's ``<T>Fields``."""
    return _codec(ggml_type).unpack(raw)


def dequantize_blocks(fields: BlockFields) -> torch.Tensor:
    """Any ``<T>Fields`` -> float32 [nb, BLOCK_SIZE[T]], without packing."""
    return _codec(fields.ggml_type).dequantize(fields)


def dequantize(raw: torch.Tensor, ggml_type: int, n_elements: int) -> torch.Tensor:
    """GGML tensor bytes -> float32 [n_elements], bit-exact to ``gguf.quants.dequantize``.

    ``raw`` is uint8, 1-D (the whole tensor) or 2-D (e.g. [rows, row_bytes] or [n_blocks, type_size]); it is read
    in row-major order. ``n_elements`` must be a multiple of the block size and match the byte count exactly.
    """
    t = GGMLType(ggml_type)
    if t not in SUPPORTED_DEQUANT_TYPES:
        raise NotImplementedError(f"dequantization of GGML type {t.name} is not supported")
    if raw.dtype != torch.uint8 or raw.dim() not in (1, 2):
        raise ValueError(f"expected 1-D or 2-D uint8 bytes, got {raw.dtype} {list(raw.shape)}")
    block, size = BLOCK_SIZE[t], TYPE_SIZE[t]
    if n_elements < 0 or n_elements % block or raw.numel() != n_elements // block * size:
        raise ValueError(
            f"{t.name}: {n_elements} elements need a multiple of {block} elements stored in "
            f"{max(n_elements, 0) // block * size} bytes, got {raw.numel()} bytes"
        )
    flat = _aligned(raw.reshape(-1))
    if t in _SCALAR_DECODERS:
        return _SCALAR_DECODERS[t](flat)
    codec = _CODECS[t]
    return codec.dequantize(codec.unpack(flat.reshape(-1, size))).reshape(-1)

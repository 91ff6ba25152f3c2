"""formats/bitpack.py against compressed-tensors, the library whose ``pack-quantized`` layout it reproduces.

* ``unpack_rows(pack_rows(v))`` is the identity for every width 1..8 and any row length (odd ones included), and
  the packed width is ceil(n·bits/32) words.
* Golden: ``pack_rows(v + 2^(bits-1))`` equals compressed-tensors' ``pack_to_int32(v)`` word for word, along the
  input dim (weights) and along dim 0 (zero points, ``packed_dim=0``), and its ``unpack_from_int32`` inverts ours.
* End to end: scales and zero points chosen by qconv (``quantize_weight`` on an IntGrid), packed by ``pack_ct``,
  decompress with compressed-tensors' own ``PackedQuantizationCompressor`` to exactly our dequantized weights, and
  its ``compress`` of the same weight / scale / zero point gives our ``weight_packed`` / ``weight_zero_point``
  bytes exactly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.formats.bitpack import pack_rows, packed_words, unpack_rows
from qconv.formats.compressed_tensors import pack_ct
from qconv.quant.int_grid import quantize_weight
from qconv.quant.tensor import IntGrid

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
ct_base = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
ct_quant = pytest.importorskip("compressed_tensors.quantization")

pack_to_int32 = ct_helpers.pack_to_int32
unpack_from_int32 = ct_helpers.unpack_from_int32
PackedQuantizationCompressor = ct_base.PackedQuantizationCompressor

ALL_BITS = list(range(1, 9))


def random_codes(rows: int, n: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (rows, n), generator=g, dtype=torch.int64).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Round trips and layout


@settings(max_examples=120, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(0, 5), n=st.integers(0, 137), seed=st.integers(0, 2**31 - 1))
def test_round_trip(bits, rows, n, seed):
    v = random_codes(rows, n, bits, seed)
    p = pack_rows(v, bits)
    assert p.dtype == torch.int32
    assert tuple(p.shape) == (rows, packed_words(n, bits))
    u = unpack_rows(p, bits, n)
    assert u.dtype == torch.uint8
    assert torch.equal(u, v)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("n", [1, 3, 31, 33, 63, 65, 97])
def test_round_trip_odd_lengths_extremes(bits, n):
    for fill in (0, (1 << bits) - 1):
        v = torch.full((2, n), fill, dtype=torch.uint8)
        assert torch.equal(unpack_rows(pack_rows(v, bits), bits, n), v)
    v = random_codes(3, n, bits, n * 10 + bits)
    assert torch.equal(unpack_rows(pack_rows(v, bits), bits, n), v)


def test_packed_words():
    assert packed_words(0, 4) == 0
    assert packed_words(8, 4) == 1
    assert packed_words(9, 4) == 2
    assert packed_words(32, 3) == 3
    assert packed_words(33, 3) == 4
    assert packed_words(11, 3) == 2  # 33 bits
    assert packed_words(7, 8) == 2


def test_layout_lsb_first_and_straddling():
    # 4 bits: element k sits in bits [4k, 4k+4) of word k // 8
    v = torch.arange(16, dtype=torch.uint8).reshape(1, 16)
    p = pack_rows(v, 4)
    assert [int(x) & 0xFFFFFFFF for x in p[0]] == [0x76543210, 0xFEDCBA98]
    # 3 bits: element 10 occupies bits 30..32, its top bit is bit 0 of word 1
    v = torch.zeros(1, 12, dtype=torch.uint8)
    v[0, 10] = 0b111
    p = pack_rows(v, 3)
    assert (int(p[0, 0]) & 0xFFFFFFFF) == 0b11 << 30
    assert int(p[0, 1]) == 1
    # the sign bit of a word is data: a negative int32 unpacks fine
    v = torch.full((1, 4), 255, dtype=torch.uint8)
    assert int(pack_rows(v, 8)[0, 0]) == -1
    assert torch.equal(unpack_rows(torch.tensor([[-1]], dtype=torch.int32), 8, 4), v)


def test_accepts_wider_integer_inputs():
    v = random_codes(4, 21, 5, 0)
    for dt in (torch.int32, torch.int64, torch.int16):
        assert torch.equal(pack_rows(v.to(dt), 5), pack_rows(v, 5))


# ---------------------------------------------------------------------------------------------------------------
# Golden: compressed-tensors' packer


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 32), (4, 33), (2, 100), (6, 129)])
def test_matches_pack_to_int32_along_input(bits, shape):
    codes = random_codes(*shape, bits, bits * 1000 + shape[1])
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    theirs = pack_to_int32(signed, bits)
    ours = pack_rows(codes, bits)
    assert theirs.dtype == ours.dtype == torch.int32
    assert torch.equal(ours, theirs)
    back = unpack_from_int32(ours, bits, torch.Size(shape))
    assert torch.equal(back, signed)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (32, 2), (33, 4), (100, 1), (129, 5)])
def test_matches_pack_to_int32_along_dim0(bits, shape):
    # zero points [out, G] are packed along the output dim
    codes = random_codes(*shape, bits, bits * 77 + shape[0])
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    theirs = pack_to_int32(signed, bits, packed_dim=0)
    ours = pack_rows(codes.T.contiguous(), bits).T.contiguous()
    assert tuple(ours.shape) == (packed_words(shape[0], bits), shape[1])
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size(shape), packed_dim=0), signed)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), n=st.integers(1, 90), seed=st.integers(0, 2**31 - 1))
def test_matches_pack_to_int32_property(bits, rows, n, seed):
    codes = random_codes(rows, n, bits, seed)
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_rows(codes, bits), pack_to_int32(signed, bits))


# ---------------------------------------------------------------------------------------------------------------
# End to end with compressed-tensors' compressor


def ct_scheme(grid: IntGrid):
    args = ct_quant.QuantizationArgs(
        num_bits=grid.bits,
        type="int",
        symmetric=grid.symmetric,
        strategy="channel" if grid.group_size == -1 else "group",
        group_size=None if grid.group_size == -1 else grid.group_size,
    )
    return ct_quant.QuantizationScheme(targets=["Linear"], weights=args)


CASES = [
    (bits, sym, gs, sdt)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for gs in (16, 32, -1)
    for sdt in (torch.float32, torch.bfloat16, torch.float16)
    if (gs == 32) == (sdt == torch.float16)  # group 16 and channel with f32/bf16 scales; group 32 with f16
]


@pytest.mark.parametrize("bits, sym, group, scale_dtype", CASES)
def test_compressed_tensors_compressor_agrees(bits, sym, group, scale_dtype):
    out_f, in_f = 37, 96  # out·bits is not a multiple of 32 for 3 and 4 bits: zero points straddle words
    gen = torch.Generator().manual_seed(bits * 100 + group)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    w[3] = 0.0  # an all-zero row
    w[5, :16] = 0.02  # a constant group
    grid = IntGrid(bits, group, sym, scale_dtype=scale_dtype)
    qt = quantize_weight(w, grid)
    ours = pack_ct(qt)
    scheme = ct_scheme(grid)

    # their decompress of our tensors == our dequantization (computed in the scale's dtype, as they do)
    sd = {k: ours[k] for k in ("weight_packed", "weight_scale", "weight_shape")}
    if not sym:
        sd["weight_zero_point"] = ours["weight_zero_point"]
    assert set(PackedQuantizationCompressor.compression_param_names(scheme)) == set(ours)
    dec = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    assert dec.dtype == scale_dtype
    assert torch.equal(dec, qt.dequantize(scale_dtype))
    assert torch.equal(dec.float(), qt.dequantize(torch.float32).to(scale_dtype).float())

    # their compress of the same weight, scale and zero point == our packed bytes
    csd = {"weight": w, "weight_scale": qt.scales}
    if not sym:
        csd["weight_zero_point"] = (qt.zeros - grid.mid).to(torch.int8)
    comp = PackedQuantizationCompressor.compress(csd, scheme)
    assert set(comp) == set(ours)
    assert torch.equal(comp["weight_packed"], ours["weight_packed"])
    assert torch.equal(comp["weight_shape"], ours["weight_shape"])
    if not sym:
        assert torch.equal(comp["weight_zero_point"], ours["weight_zero_point"])
    # ... and of our dequantized weight, which lies on the grid
    csd["weight"] = qt.dequantize(torch.float32)
    assert torch.equal(PackedQuantizationCompressor.compress(csd, scheme)["weight_packed"], ours["weight_packed"])

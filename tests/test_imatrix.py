"""Importance matrices: `qconv imatrix` writes llama.cpp's GGUF form (gguf-py reads it), both llama.cpp forms are
read back, corrupt files are refused, and `--imatrix` steers quantization."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch

from qconv.errors import InputError
from qconv.imatrix import read_imatrix, write_imatrix

from conftest import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_files):
    return tiny_model(tmp_path_factory.mktemp("tiny"), "llama", tokenizer_files)


def test_qconv_imatrix_file(cli, tiny, tmp_path):
    out = tmp_path / "imatrix.gguf"
    r = cli("imatrix", tiny, "--out", out, "--calib-samples", 4, "--calib-seqlen", 64, "-q", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["entries"] == 2 * 7
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_count"].contents() == 4
    assert reader.fields["imatrix.chunk_size"].contents() == 64
    assert reader.fields["imatrix.datasets"].contents() == ["qconv-default"]
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_q.weight.in_sum2" in names and "blk.1.attn_q.weight.counts" in names
    by = {t.name: np.array(t.data) for t in reader.tensors}
    assert by["blk.0.attn_q.weight.counts"][0] == 4 * 64
    imat = read_imatrix(out)
    # q, k and v read the same normed input: identical entries; values are the mean x² over all tokens
    assert torch.equal(imat["blk.0.attn_q.weight"], imat["blk.0.attn_v.weight"])
    assert torch.allclose(imat["blk.0.attn_q.weight"], torch.from_numpy(by["blk.0.attn_q.weight.in_sum2"]) / 256)

    # layer 0's q_proj input is input_layernorm(embeddings): recompute independently
    import transformers

    from qconv.calibration import build_calibration
    from qconv.model.runner import LayerRunner
    from qconv.model.source import open_source

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny))
    calib = build_calibration(None, tok, 4, 64, seed=0)
    runner = LayerRunner(open_source(str(tiny)))
    x = runner.load_layer(0).input_layernorm(runner.embed(calib.tokens)).reshape(-1, 128)
    torch.testing.assert_close(imat["blk.0.attn_q.weight"], x.square().mean(0), rtol=1e-4, atol=1e-7)


def test_legacy_dat_and_round_trip(tmp_path):
    # llama.cpp's legacy layout: n_entries, then per entry name, ncall, nval, values = (sum/count)·ncall
    values = [2.0, 4.0, 6.0]
    blob = struct.pack("<i", 1) + struct.pack("<i", 5) + b"blk.0" + struct.pack("<ii", 2, 3)
    blob += struct.pack("<3f", *values) + struct.pack("<i", 10)
    p = tmp_path / "legacy.dat"
    p.write_bytes(blob)
    assert read_imatrix(p)["blk.0"].tolist() == [1.0, 2.0, 3.0]

    g = tmp_path / "m.gguf"
    write_imatrix(g, {"blk.0.ffn_up.weight": (torch.tensor([3.0, 6.0]), 3), "b": (torch.tensor([1.0]), 0)}, [], 1, 8)
    back = read_imatrix(g)
    assert back["blk.0.ffn_up.weight"].tolist() == [1.0, 2.0]
    assert back["b"].tolist() == [1.0]  # no tokens: neutral importance, as llama.cpp does


@pytest.mark.parametrize(
    "blob,msg",
    [
        (struct.pack("<i", 3), "truncated"),
        (struct.pack("<ii", 1, 9999), "name length"),
        (struct.pack("<ii", 1, 1) + b"x" + struct.pack("<ii2f", 1, 2, 1.0, float("nan")), "non-finite"),
        (struct.pack("<i", 1) + struct.pack("<i", 1) + b"x" + struct.pack("<ii", 1, 10**8), "claims"),
    ],
)  # fmt: skip
def test_corrupt_imatrix(tmp_path, blob, msg):
    p = tmp_path / "bad.dat"
    p.write_bytes(blob)
    with pytest.raises(InputError, match=rf"bad.dat: corrupt imatrix.*{msg}"):
        read_imatrix(p)


def test_imatrix_steers_quantization(cli, tiny, tmp_path):
    imat = tmp_path / "imatrix.gguf"
    assert cli("imatrix", tiny, "--out", imat, "--calib-samples", 4, "--calib-seqlen", 64, "-q").code == 0
    runs = {}
    for label, extra in (("none", ()), ("file", ("--imatrix", imat)), ("auto", ("--imatrix", "auto"))):
        out = tmp_path / f"{label}.gguf"
        args = ("--format", "gguf", "--gguf-type", "Q4_0", "--calib-samples", 4, "--calib-seqlen", 64)
        r = cli("quantize", tiny, *args, *extra, "--out", out, "-q")
        assert r.code == 0, r.stderr
        runs[label] = json.loads(out.with_name(out.name + ".qconv.json").read_text())
    t = "model.layers.1.mlp.up_proj.weight"
    assert "rel_mse_weighted" in runs["file"]["tensors"][t] and "rel_mse_weighted" not in runs["none"]["tensors"][t]
    assert runs["auto"]["calibration"]["samples"] == 4 and runs["file"]["calibration"] is None
    # the chosen weights differ with importance (the type rules that depend on an imatrix: tests/test_gguf_mix.py)
    from qconv.formats.gguf_reader import GGUFFile

    a, b = GGUFFile(tmp_path / "none.gguf"), GGUFFile(tmp_path / "file.gguf")
    assert not torch.equal(a.read_raw("blk.1.ffn_up.weight"), b.read_raw("blk.1.ffn_up.weight"))
    assert b.kv["general.qconv.importance"] == "imatrix file"

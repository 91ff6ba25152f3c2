"""GGUF end to end: SmolLM2 → `qconv quantize --format gguf` → llama.cpp (llama-cpp-python, built from llama.cpp's
sources) loads it, tokenizes like transformers, and gives logits close to qconv's own dequantized model."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from qconv.formats.ggml_blocks import GGMLType as T
from qconv.formats.ggml_blocks import pack
from qconv.formats.gguf_reader import GGUFFile
from qconv.methods.rtn import rtn
from qconv.model.runner import LayerRunner, logits_fn
from qconv.model.source import open_source
from qconv.quant.tensor import GGMLGrid

from llamacpp import logits, tokenize

TEXT = (
    "The committee met on Tuesday to review the budget. Dr. Okafor's report — 37 pages, 12 tables — argued that "
    "the river crossing (built 1887) needs 2.4 million euros of repairs. Résumé: ça coûte cher!"
)
ALL_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]


def qconv_logits(path, ids: list[int]) -> torch.Tensor:
    src = open_source(str(path))
    r = LayerRunner(src)
    h = r.embed(torch.tensor([ids]))
    for i in range(src.num_layers):
        h = r.run(r.load_layer(i), i, h, 8)
    return logits_fn(r)(h)[0]


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_packed_bytes_dequantize_identically_in_gguf_py(t, smollm2_dithered_dir):
    """Real weights → qconv's quantizer → packed blocks; gguf-py's reference dequantizer gives qconv's own
    dequantized weights bit for bit."""
    w = open_source(str(smollm2_dithered_dir)).read("model.layers.2.mlp.down_proj.weight").float()[:64]
    qt = rtn(w, GGMLGrid(int(t)))
    raw = pack(qt.fields).numpy().reshape(w.shape[0], -1)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t)))
    assert np.array_equal(theirs, qt.dequantize(torch.float32).numpy())


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, smollm2_dithered_dir):
    from click.testing import CliRunner

    from qconv.cli import main

    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for ftype in ("F32", "Q8_0", "Q4_K_M"):
        path = root / f"smol-{ftype}.gguf"
        r = CliRunner().invoke(main, ["quantize", str(smollm2_dithered_dir), "--format", "gguf", "--gguf-type", ftype,
                                      "--out", str(path), "-q", "--json"])  # fmt: skip
        assert r.exit_code == 0, r.stderr
        out[ftype] = path
    return out


@pytest.mark.slow
def test_llama_cpp_runs_qconv_gguf(gguf_files, smollm2_dithered_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dithered_dir))
    ids = tok(TEXT, add_special_tokens=False).input_ids
    for ftype, path in gguf_files.items():
        # llama.cpp's tokenizer, built from the vocabulary qconv wrote, splits text exactly like transformers
        assert tokenize(path, TEXT, add_bos=False) == ids, ftype
        theirs = logits(path, ids)
        ours = qconv_logits(path, ids)
        kl = (ours.log_softmax(-1).exp() * (ours.log_softmax(-1) - theirs.log_softmax(-1))).sum(-1)
        top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean()
        if ftype == "F32":
            # same weights, float math on both sides: only llama.cpp's f16 KV cache and summation order differ
            assert (ours - theirs).abs().max() < 0.1
        else:
            # llama.cpp multiplies quantized weights with activations it quantizes to 8 bits per 32 (Q8_0/Q8_K)
            # on CPU, which qconv's float reference does not: expect small, not zero, differences
            assert kl.mean() < 0.05 and top1 >= 0.85, (ftype, float(kl.mean()), float(top1))


def test_gguf_file_structure(gguf_files):
    g = GGUFFile(gguf_files["Q4_K_M"])
    kv = g.kv
    assert kv["general.architecture"] == "llama" and kv["general.file_type"] == 15
    assert kv["general.quantization_version"] == 2 and kv["general.quantized_by"].startswith("qconv ")
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "smollm"
    assert len(kv["tokenizer.ggml.tokens"]) == 49152 and kv["llama.block_count"] == 30
    types = {n: t.type_name for n, t in g.tensors.items()}
    # llama-quantize's Q4_K_M on a 576-wide model: K types fall back where rows are 576 long
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.3.attn_v.weight"] == "Q5_0"
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.3.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    manifest = json.loads(gguf_files["Q4_K_M"].with_name("smol-Q4_K_M.gguf.qconv.json").read_text())
    assert manifest["format"]["name"] == "gguf" and manifest["summary"]["quantized_tensors"] == 211


def test_gguf_reads_back_as_the_model_qconv_wrote(gguf_files, smollm2_dithered_dir):
    """The reader undoes llama's q/k permutation: q_proj of the F32 file equals the source exactly."""
    a = open_source(str(gguf_files["F32"]))
    b = open_source(str(smollm2_dithered_dir))
    for name in ("model.layers.4.self_attn.q_proj.weight", "model.layers.4.self_attn.k_proj.weight",
                 "model.layers.4.mlp.up_proj.weight", "model.norm.weight"):  # fmt: skip
        assert torch.equal(a.read(name), b.read(name).float()), name


def test_gguf_to_gguf_and_splits(cli, tmp_path):
    """A GGUF input (the packaged Q4_1 model) re-quantized to Q8_0 in llama.cpp splits; llama.cpp loads them."""
    out = tmp_path / "smol-q8.gguf"
    r = cli("quantize", "builtin:smollm2-135m", "--format", "gguf", "--gguf-type", "Q8_0", "--split-max-size",
            "60MB", "--out", out, "-q", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    parts = sorted(tmp_path.glob("smol-q8-*-of-*.gguf"))
    n = len(parts)
    assert n >= 2 and [p.name for p in parts] == [f"smol-q8-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert r.json()["output"] == str(parts[0])
    assert all(p.stat().st_size <= 60e6 + 2e6 for p in parts)  # tensor data ≤ 60 MB, plus metadata in the first
    g = GGUFFile(parts[0])
    assert g.kv["split.count"] == n and g.kv["tokenizer.ggml.pre"] == "smollm"
    ids = tokenize(parts[0], "Hello there, general Kenobi.", add_bos=False)
    assert logits(parts[0], ids).shape == (len(ids), 49152)


def test_gguf_bad_input(cli, smollm2_dir, tmp_path):
    out = tmp_path / "x.gguf"
    r = cli("quantize", smollm2_dir, "--format", "gguf", "--gguf-type", "Q7_K", "--out", out)
    assert r.code == 2 and "--gguf-type Q7_K: unknown" in r.stderr and not out.exists()
    bad = tmp_path / "bad.imatrix"
    bad.write_bytes(b"\x05\x00\x00\x00\xff\xff\xff\x7f")
    r = cli("quantize", smollm2_dir, "--format", "gguf", "--imatrix", bad, "--out", out)
    assert r.code == 2 and "bad.imatrix: corrupt imatrix" in r.stderr and not out.exists()
    r = cli("quantize", smollm2_dir, "--format", "gguf", "--out", tmp_path / "x.safetensors")
    assert r.code == 2 and "name it *.gguf" in r.stderr
    r = cli("quantize", smollm2_dir, "--format", "gguf", "--tensor-type", "attn_v", "--out", out)
    assert r.code == 2 and "REGEX=TYPE" in r.stderr

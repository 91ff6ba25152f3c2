"""The quantize pipeline: determinism, sharding, --ignore, calibration flowing through quantized layers,
verification, manifest, inspect and convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qconv.methods import METHODS
from qconv.methods.rtn import RTN
from qconv.model.runner import LayerRunner
from qconv.model.source import open_source

from conftest import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_files) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny"), "llama", tokenizer_files)


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_inputs_same_bytes(cli, tiny, tmp_path):
    args = ("--bits", 3, "--group-size", 32, "--asym", "--clip", "mse", "--calib-samples", 8, "--calib-seqlen", 64)
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("quantize", tiny, "--out", a, "-q", *args).code == 0
    assert cli("quantize", tiny, "--out", b, "-q", *args).code == 0
    fa, fb = files_of(a), files_of(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        if name in ("qconv.json", "README.md"):  # they name the output path in the recorded command line
            continue
        assert fa[name] == fb[name], name
    ma, mb = json.loads(fa["qconv.json"]), json.loads(fb["qconv.json"])
    ma.pop("command"), mb.pop("command")
    assert ma == mb
    assert ma["calibration"]["samples"] == 8 and len(ma["calibration"]["tokens_sha256"]) == 64


def test_shards_ignore_and_manifest(cli, tiny, tmp_path):
    import transformers

    out = tmp_path / "sharded"
    r = cli("quantize", tiny, "--out", out, "--bits", 4, "--group-size", 32, "--max-shard-size", "3MB",
            "--ignore", r"layers\.1\.mlp\.down_proj$", "--dtype", "float32", "-q", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"]
    src = open_source(str(out))
    assert "model.layers.1.mlp.down_proj.weight" in src.raw.names()  # kept dense
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["summary"]["quantized_linears"] == 13
    assert "model.layers.1.mlp.down_proj" in manifest["summary"]["kept_dense_linears"]
    assert manifest["calibration"] is None  # plain RTN needs no calibration
    m = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    base = open_source(str(tiny))
    torch.testing.assert_close(
        m.state_dict()["model.layers.1.mlp.down_proj.weight"], base.read("model.layers.1.mlp.down_proj.weight")
    )


def test_calibration_flows_through_quantized_layers(cli, tiny, tmp_path, monkeypatch):
    """Layer i's statistics are collected on the outputs of the already quantized layers < i."""
    seen = {}

    class Spy(RTN):
        name = "spy"

        @property
        def needs_calibration(self):
            return True

        def quantize_layer(self, ctx):
            stats = ctx.collect({"self_attn.q_proj": {"sq_mean", "abs_mean", "xtx"}})
            seen[ctx.index] = stats["self_attn.q_proj"]
            return super().quantize_layer(ctx)

    monkeypatch.setitem(METHODS, "spy", Spy)
    out = tmp_path / "spy"
    r = cli("quantize", tiny, "--method", "spy", "--out", out, "--bits", 2, "--group-size", 32,
            "--calib-samples", 4, "--calib-seqlen", 32, "--dtype", "float32", "-q", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["calibration"]["source"] == "qconv-default"

    # recompute layer 1's q_proj input from the *quantized* layer 0 of the artifact
    import transformers

    from qconv.calibration import build_calibration

    tok = transformers.AutoTokenizer.from_pretrained(str(tiny))
    calib = build_calibration(None, tok, 4, 32, seed=0)
    art = LayerRunner(open_source(str(out)))
    h = art.embed(calib.tokens)
    h = art.run(art.load_layer(0), 0, h, 4)
    layer1 = art.load_layer(1)
    x = layer1.input_layernorm(h).reshape(-1, h.shape[-1])
    st = seen[1]
    assert st.count == x.shape[0]
    torch.testing.assert_close(st.sq_mean, x.square().mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.abs_mean, x.abs().mean(0), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st.hessian, x.T @ x / x.shape[0], rtol=1e-3, atol=1e-5)
    # and they differ from what the unquantized layer 0 would have produced (2-bit changes the activations)
    base = LayerRunner(open_source(str(tiny)))
    hb = base.run(base.load_layer(0), 0, base.embed(calib.tokens), 4)
    xb = base.load_layer(1).input_layernorm(hb).reshape(-1, hb.shape[-1])
    assert not torch.allclose(st.sq_mean, xb.square().mean(0), rtol=1e-3)


@pytest.mark.triton
def test_verify_kernel_under_interpreter(cli, tiny, tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "k"
    r = cli("quantize", tiny, "--out", out, "--bits", 4, "--group-size", 64, "--asym", "--verify", "kernel", "-q")
    assert r.code == 0, r.stderr
    v = json.loads((out / "qconv.json").read_text())["verification"]
    assert v == {"mode": "kernel", "paths": ["kernel"], "tensors": 14}


def test_bad_packing_aborts_write(cli, tiny, tmp_path, monkeypatch):
    import qconv.formats.compressed_tensors as ct

    real = ct.pack_ct

    def broken(qt):
        t = real(qt)
        t["weight_packed"] = t["weight_packed"].clone()
        t["weight_packed"][0, 0] ^= 1
        return t

    monkeypatch.setattr(ct, "pack_ct", broken)
    out = tmp_path / "bad"
    r = cli("quantize", tiny, "--out", out, "--bits", 4, "--group-size", 32, "--verify", "reference")
    assert r.code == 1
    assert "model.layers.0.self_attn.q_proj: packed ct-int layout does not dequantize" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".bad.qconv-tmp-*"))


def test_inspect_and_convert(cli, tiny, tmp_path):
    out = tmp_path / "q"
    assert cli("quantize", tiny, "--out", out, "--bits", 4, "--group-size", 32, "-q").code == 0
    r = cli("inspect", out, "--json")
    assert r.code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "safetensors" and info["quantization_config"]["format"] == "pack-quantized"
    assert 4.0 < info["quantized_bits_per_weight"] < 5.5
    assert info["qconv"]["summary"]["quantized_linears"] == 14
    r = cli("inspect", out)
    assert r.code == 0 and "weight_packed" in r.stdout

    r = cli("inspect", "builtin:smollm2-135m", "--json")
    assert r.code == 2  # inspect takes paths; builtin aliases are for models

    dense = tmp_path / "dense"
    assert cli("convert", out, "--out", dense, "--dtype", "float32", "-q").code == 0
    a, b = open_source(str(out)), open_source(str(dense))
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        torch.testing.assert_close(a.read(n).float(), b.read(n).float(), rtol=0, atol=0)


def test_inspect_gguf(cli):
    from qconv.model.source import builtin_path

    r = cli("inspect", builtin_path("smollm2-135m"), "--json")
    assert r.code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "gguf" and info["types"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert info["metadata"]["general.architecture"] == "llama"
    assert info["metadata"]["tokenizer.ggml.tokens"] == "[49152 items]"


def test_input_digests_start_before_the_source_opens(tiny, tmp_path):
    """The CLI starts hashing the inputs before torch is imported, from a torch-free guess of the source's input
    files: the guess must be exactly the source's list (else the pipeline starts over), and gives its digests."""
    from qconv.manifest import BackgroundDigests, file_digests, likely_inputs

    src = open_source(str(tiny))
    guess = likely_inputs(str(tiny))
    assert [p.resolve() for p in guess] == [Path(p).resolve() for p in src.input_files]
    early = BackgroundDigests(guess)
    assert early.covers(src.input_files) and early.result() == file_digests(src.input_files)
    assert not early.covers(src.input_files[1:])
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert likely_inputs(str(gguf)) == [gguf]
    assert likely_inputs("HuggingFaceTB/SmolLM2-135M") == []  # a hub id: the pipeline hashes after the download


def test_trim_keeps_bounded_slack():
    from qconv.memory import trim

    assert trim(slack=1 << 60) is False  # less free heap than the slack: nothing returned to the OS
    assert isinstance(trim(slack=0), bool)


def test_input_sha256_across_mapping_windows(tmp_path, monkeypatch):
    """The manifest's input digests are hashed from mapped windows: sizes around the window edges, the empty file
    and a cancelled digest."""
    import hashlib
    import mmap
    import threading

    from qconv import manifest

    window = mmap.ALLOCATIONGRANULARITY
    monkeypatch.setattr(manifest, "_HASH_WINDOW", window)
    data = bytes(range(256)) * (3 * window // 256 + 1)
    for n in (0, 1, window - 1, window, window + 1, 3 * window + 5):
        p = tmp_path / f"f{n}"
        p.write_bytes(data[:n])
        assert manifest.sha256_file(p, chunk=window // 4 + 3) == hashlib.sha256(data[:n]).hexdigest(), n
    stop = threading.Event()
    stop.set()
    assert manifest.sha256_file(tmp_path / f"f{3 * window + 5}", cancel=stop) == ""

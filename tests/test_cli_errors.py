"""Bad input: one line naming the file and the problem, exit code 2, nothing left behind."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model


def assert_clean_failure(r, out: Path, *needles: str) -> None:
    assert r.code == 2, (r.code, r.stderr)
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("qconv: error: ")]
    # progress lines may precede it; the error itself is one line, and the last
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    # no output, no temporary leftovers next to it
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".qconv-tmp-" in p.name]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer_files) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny"), "llama", tokenizer_files)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_path(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("quantize", tmp_path / "nope", "--out", out)
    assert_clean_failure(r, out, "nope", "no such file or directory")


def test_corrupt_safetensors_header(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    f = m / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 10] = b"#garbage!!"
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    r = cli("quantize", m, "--group-size", 32, "--out", out)
    assert_clean_failure(r, out, "model.safetensors", "header")


def test_truncated_shard(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    f = m / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    r = cli("quantize", m, "--group-size", 32, "--out", out)
    assert_clean_failure(r, out, "model.safetensors", "truncated")


def test_missing_shard_of_index(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    r = cli("quantize", m, "--group-size", 32, "--out", out)
    assert_clean_failure(r, out, "model-00002-of-00002.safetensors", "missing")


def test_unsupported_architecture(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (m / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    r = cli("quantize", m, "--group-size", 32, "--out", out)
    assert_clean_failure(r, out, "gpt_neox", "supported: llama, mistral, qwen2, qwen3")


def test_nan_in_weight_names_tensor(cli, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    m = copy_model(tiny_llama, tmp_path / "m")
    sd = load_file(m / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    sd["model.layers.1.mlp.up_proj.weight"][4, 5] = float("inf")
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    r = cli("quantize", m, "--group-size", 32, "--out", out)
    assert_clean_failure(r, out, "model.layers.1.mlp.up_proj.weight", "NaN/Inf")


def test_existing_output_needs_force(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = cli("quantize", tiny_llama, "--group-size", 32, "--out", out)
    assert r.code == 2 and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "user data"
    r = cli("quantize", tiny_llama, "--group-size", 32, "--out", out, "--force", "-q")
    assert r.code == 0, r.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_group_size_that_does_not_divide(cli, smollm2_dir, tmp_path):
    out = tmp_path / "out"
    r = cli("quantize", smollm2_dir, "--group-size", 128, "--out", out)
    # SmolLM2's hidden size is 576: 128 does not divide it; the message names the layer and what works
    assert_clean_failure(r, out, "model.layers.0.self_attn.q_proj", "576", "32, 64", "-1 (per channel)")


def test_output_may_not_overwrite_input(cli, tiny_llama, tmp_path):
    m = copy_model(tiny_llama, tmp_path / "m")
    r = cli("quantize", m, "--group-size", 32, "--out", m, "--force")
    assert r.code == 2 and "overwrite an input" in r.stderr
    assert (m / "model.safetensors").is_file()


def test_pickle_refused_unless_allowed(cli, tiny_llama, tmp_path):
    from safetensors.torch import load_file

    m = copy_model(tiny_llama, tmp_path / "m")
    sd = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    torch.save(sd, m / "pytorch_model.bin")
    out = tmp_path / "out"
    r = cli("quantize", m, "--group-size", 32, "--out", out)
    assert_clean_failure(r, out, "pytorch_model.bin", "--allow-pickle")
    r = cli("quantize", m, "--group-size", 32, "--out", out, "--allow-pickle", "-q")
    assert r.code == 0, r.stderr


def test_hub_id_offline(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import importlib

    import huggingface_hub.constants as c

    importlib.reload(c)  # the hub library reads HF_HUB_OFFLINE at import time
    out = tmp_path / "out"
    r = cli("quantize", "someorg/some-model-xyz", "--out", out)
    importlib.reload(c)
    assert_clean_failure(r, out, "someorg/some-model-xyz", "HF_HUB_OFFLINE=1")


def test_bad_options(cli, tiny_llama, tmp_path):
    out = tmp_path / "out"
    r = cli("quantize", tiny_llama, "--method", "nope", "--out", out)
    assert_clean_failure(r, out, "--method nope", "rtn")
    r = cli("quantize", tiny_llama, "--format", "nope", "--out", out)
    assert_clean_failure(r, out, "--format nope")
    r = cli("quantize", tiny_llama, "--bits", "9", "--group-size", 32, "--out", out)
    assert_clean_failure(r, out, "--bits 9")
    r = cli("quantize", tiny_llama, "--ignore", "([", "--group-size", 32, "--out", out)
    assert_clean_failure(r, out, "--ignore")
    r = cli("quantize", tiny_llama, "--group-size", 32, "--calib", tmp_path / "missing.txt", "--clip", "mse",
            "--out", out)  # fmt: skip
    assert_clean_failure(r, out, "missing.txt")


def test_corrupt_gguf(cli, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + struct.pack("<Q", 1 << 40))
    out = tmp_path / "out"
    r = cli("quantize", bad, "--out", out)
    assert_clean_failure(r, out, "bad.gguf", "corrupt")


@pytest.mark.parametrize(
    "opt, needle",
    [("nokey", "expected KEY=VALUE"), ("unknown=1", "not an option of --method rtn and --format safetensors")],
)
def test_bad_opt(cli, tiny_llama, tmp_path, opt, needle):
    out = tmp_path / "out"
    r = cli("quantize", str(tiny_llama), "--out", str(out), "--opt", opt)
    assert_clean_failure(r, out, needle)


def test_methods_listing(cli):
    r = cli("methods", "--json")
    assert r.code == 0, r.stderr
    rows = json.loads(r.stdout)
    names = {(row["kind"], row["name"]) for row in rows}
    assert {("method", "rtn"), ("method", "gptq"), ("format", "safetensors"), ("format", "gguf")} <= names


def test_malformed_packed_tensor_is_a_clean_error(cli, tiny_llama, tmp_path):
    """A quantized artifact whose packed parts disagree (a truncated scale) fails reading with exit 2, not a
    traceback."""
    from safetensors.torch import load_file

    art = tmp_path / "art"
    r = cli("quantize", tiny_llama, "--out", art, "--bits", "4", "--group-size", "32", "--quiet")
    assert r.code == 0, r.stderr
    f = next(art.glob("*.safetensors"))
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("q_proj.weight_scale"))
    tensors[key] = tensors[key][:, :1].contiguous()
    save_file(tensors, f)
    out = tmp_path / "dense"
    r = cli("convert", art, "--out", out, "--quiet")
    assert_clean_failure(r, out, "cannot be decoded", key.removesuffix("_scale"))


def test_console_entry_exit_codes_and_output(tmp_path):
    """The real entry point (``python -m qconv``, the ``qconv`` script) ends the process itself once the command is
    done (skipping the interpreter's slow teardown): exit codes, stdout and stderr must arrive intact."""
    import subprocess
    import sys

    def qconv(*args):
        return subprocess.run([sys.executable, "-m", "qconv", *map(str, args)], capture_output=True, text=True)

    r = qconv("--version")
    assert r.returncode == 0 and "qconv, version" in r.stdout
    r = qconv("quantize", tmp_path / "missing", "--out", tmp_path / "out", "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout.strip().splitlines()[-1])["exit_code"] == 2
    assert "qconv: error:" in r.stderr and "missing" in r.stderr
    r = qconv("no-such-command")
    assert r.returncode == 2 and "No such command" in r.stderr

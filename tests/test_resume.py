"""--resume: a run killed mid-way continues after its last finished layer and writes the same bytes as an
uninterrupted run; a changed job refuses to resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_model

LAYERS = 8


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory, tokenizer_files) -> Path:
    return tiny_model(tmp_path_factory.mktemp("deep"), "llama", tokenizer_files, num_hidden_layers=LAYERS)


def artifact_files(path: Path) -> dict[str, bytes]:
    """Every file of the artifact except the manifest and model card (they hold timings and the command line)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {p.name: p.read_bytes() for p in files if p.name not in ("qconv.json", "README.md")}


def quantize_args(model: Path, out: Path, fmt: str, *extra: str) -> list[str]:
    args = ["quantize", str(model), "--out", str(out), "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--calib-samples", "8", "--calib-seqlen", "64", "--format", fmt, "--quiet", *extra]  # fmt: skip
    if fmt == "gguf":
        args += ["--gguf-type", "Q4_0", "--pure"]
    return args


def state_of(out: Path) -> dict | None:
    p = out.parent / f".{out.name}.qconv-resume" / "state.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def run_and_kill(args: list[str], out: Path, sig: int) -> int:
    """Start the CLI, wait until it has checkpointed at least one layer, then send ``sig``; returns the layer it
    had finished."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell's background jobs inherit SIGINT ignored (so would the child, which then runs to the end): restore
    # the default so Python turns SIGINT into KeyboardInterrupt as at a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "qconv", *args], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 300
    done = -1
    while time.monotonic() < deadline and proc.poll() is None:
        st = state_of(out)
        if st and st.get("done", -1) >= 1:
            done = st["done"]
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    err = proc.communicate(timeout=300)[1]
    assert done >= 1, f"the run ended before it could be interrupted: {err[-2000:]}"
    assert done < LAYERS - 1, "interrupted too late to test a resume"
    assert proc.returncode != 0
    assert not out.exists(), "an interrupted run must not leave an artifact"
    return done


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt, sig", [("safetensors", signal.SIGKILL), ("gguf", signal.SIGINT), ("gguf", signal.SIGKILL)]
)
def test_killed_run_resumes_byte_identical(cli, deep_tiny, tmp_path, fmt, sig):
    """GGUF resumes in place: its checkpoints hold names and statistics only, and the partial output survives
    (moved into the checkpoint folder on SIGINT, left in its temporary folder by SIGKILL)."""
    name = "model.gguf" if fmt == "gguf" else "model"
    ref = tmp_path / "ref" / name
    r = cli(*quantize_args(deep_tiny, ref, fmt))
    assert r.code == 0, r.stderr
    assert state_of(ref) is None, "a finished run removes its checkpoints"

    out = tmp_path / "resumed" / name
    run_and_kill(quantize_args(deep_tiny, out, fmt), out, sig)
    ckpt = out.parent / f".{out.name}.qconv-resume"
    kept = {p.suffix for p in ckpt.iterdir() if p.name.startswith("layer-")}
    assert kept == ({".json"} if fmt == "gguf" else {".safetensors"}), kept
    if fmt == "gguf":
        partial = Path(state_of(out)["temp_output"])
        assert (partial / name).is_file()
        assert (partial.parent == ckpt) == (sig == signal.SIGINT)
    r = cli(*quantize_args(deep_tiny, out, fmt, "--resume"))
    assert r.code == 0, r.stderr
    assert artifact_files(out) == artifact_files(ref)
    assert state_of(out) is None
    leftovers = [p.name for p in out.parent.iterdir() if ".qconv-" in p.name]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_in_place_resume_needs_its_partial_output(cli, deep_tiny, tmp_path):
    out = tmp_path / "model.gguf"
    run_and_kill(quantize_args(deep_tiny, out, "gguf"), out, signal.SIGINT)
    shutil.rmtree(state_of(out)["temp_output"])
    r = cli(*quantize_args(deep_tiny, out, "gguf", "--resume"))
    assert r.code == 2
    assert "partial output" in r.stderr and "run without --resume" in r.stderr
    assert not out.exists()


def test_changed_job_refuses_to_resume(cli, deep_tiny, tmp_path):
    out = tmp_path / "model"
    # a checkpoint as an interrupted run leaves it: state for this output with another job's fingerprint
    d = tmp_path / ".model.qconv-resume"
    d.mkdir()
    (d / "state.json").write_text(json.dumps({"fingerprint": "0" * 64, "done": 3, "temp_output": ""}))
    r = cli("quantize", deep_tiny, "--out", out, "--bits", "4", "--group-size", "32", "--resume", "--quiet")
    assert r.code == 2
    assert "cannot resume" in r.stderr and ".model.qconv-resume" in r.stderr
    assert not out.exists()
    # without --resume the stale checkpoint is dropped and the run starts over
    r = cli("quantize", deep_tiny, "--out", out, "--bits", "4", "--group-size", "32", "--quiet")
    assert r.code == 0, r.stderr
    assert not d.exists()


def test_resume_without_checkpoint_runs_normally(cli, deep_tiny, tmp_path):
    out = tmp_path / "model"
    r = cli("quantize", deep_tiny, "--out", out, "--bits", "4", "--group-size", "32", "--resume", "--quiet")
    assert r.code == 0, r.stderr
    assert (out / "config.json").is_file()


def test_value_encoding_round_trip():
    import torch

    from qconv.quant.int_grid import quantize_weight
    from qconv.quant.tensor import IntGrid
    from qconv.resume import decode, encode

    qt = quantize_weight(torch.randn(8, 64), IntGrid(4, 32, False, scale_dtype=torch.bfloat16))
    tensors: dict = {}
    desc = encode([("quantized", "a.weight", qt, {"grid": qt.grid.name})], "w", tensors)
    json.dumps(desc)  # metadata must be plain JSON
    ((kind, name, back, stats),) = decode(desc, tensors)
    assert back.grid == qt.grid and torch.equal(back.codes, qt.codes) and torch.equal(back.scales, qt.scales)
    assert back.stats == qt.stats


@pytest.mark.slow
def test_offloaded_activations_give_the_same_artifact(cli, deep_tiny, tmp_path):
    """--offload-activations only moves where activations live: the bytes written are the same."""
    outs = []
    for name, extra in (("mem", []), ("disk", ["--offload-activations", str(tmp_path / "acts")])):
        out = tmp_path / name
        r = cli(*quantize_args(deep_tiny, out, "safetensors", *extra))
        assert r.code == 0, r.stderr
        outs.append(artifact_files(out))
    assert outs[0] == outs[1]
    assert list((tmp_path / "acts").iterdir()) == [], "the mapped file is unlinked"


def test_no_checkpoint(cli, deep_tiny, tmp_path):
    out = tmp_path / "model"
    args = ["quantize", deep_tiny, "--out", out, "--bits", "4", "--group-size", "32", "--quiet", "--no-checkpoint"]
    r = cli(*args, "--resume")
    assert r.code == 2 and "--resume needs checkpoints" in r.stderr
    r = cli(*args)
    assert r.code == 0, r.stderr
    assert not (tmp_path / ".model.qconv-resume").exists()

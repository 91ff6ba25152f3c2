"""Calibration text: where it comes from, and how it becomes [n_samples, seqlen] token windows.

Sources: the project's own corpus (default, shipped in the package), a local .txt/.jsonl/.json/.parquet file or a
folder of them, or a Hugging Face ``datasets`` name (presets know the config, split and text field of common
calibration sets). The manifest records sha256 of the text and of the exact token windows used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from qconv.errors import InputError

# name → (dataset id, config, split, field). "messages" fields are rendered with the tokenizer's chat template.
PRESETS: dict[str, tuple[str, str | None, str, str]] = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": ("allenai/c4", "en", "validation", "text"),
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
    "ultrachat": ("HuggingFaceH4/ultrachat_200k", None, "train_sft", "messages"),
}
PLAIN_SUFFIXES = (".txt", ".raw", ".text", ".md")  # read whole, as one text (".raw": WikiText's own files)
LOCAL_SUFFIXES = (*PLAIN_SUFFIXES, ".jsonl", ".json", ".parquet")
DEFAULT_NAME = "qconv-default"


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows int64 [n, seqlen] and where they came from."""

    tokens: torch.Tensor
    source: str
    text_sha256: str
    tokens_sha256: str
    n_text_tokens: int

    def describe(self) -> dict:
        n, t = self.tokens.shape
        return {
            "source": self.source,
            "samples": n,
            "seqlen": t,
            "text_tokens": self.n_text_tokens,
            "text_sha256": self.text_sha256,
            "tokens_sha256": self.tokens_sha256,
        }


def packaged_texts(kind: str) -> list[tuple[str, str]]:
    """The corpus shipped with qconv: kind "calib" or "eval" → [(file name, text)], sorted by name."""
    root = resources.files("qconv.calibration_data").joinpath(kind)
    items = sorted((p.name, p.read_text(encoding="utf-8")) for p in root.iterdir() if p.name.endswith(".txt"))
    if not items:
        raise InputError(f"qconv's packaged {kind} corpus is missing (a broken install?)")
    return items


def _texts_from_records(records: list, where: str, field: str | None, tokenizer) -> list[str]:
    out = []
    for r in records:
        if isinstance(r, str):
            out.append(r)
        elif isinstance(r, dict):
            if field:  # an explicit field is exact: records without it are skipped
                v = r.get(field)
            elif "text" in r:
                v = r["text"]
            elif "messages" in r:
                v = r["messages"]
            else:
                v = next((x for x in r.values() if isinstance(x, str)), None)
            if isinstance(v, list):  # chat messages
                v = _render_chat(v, tokenizer)
            if isinstance(v, str):
                out.append(v)
        else:
            raise InputError(f"{where}: records must be strings or objects with a text field")
    return out


def _render_chat(messages: list, tokenizer) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages if isinstance(m, dict))


def read_local(path: Path, field: str | None = None, tokenizer=None) -> list[str]:
    """Texts of one local file: plain text (.txt/.raw/.text/.md) whole; .jsonl one record a line; .json a list
    or {"data": [...]}; .parquet a text column."""
    try:
        if path.suffix in PLAIN_SUFFIXES:
            return [path.read_text(encoding="utf-8")]
        if path.suffix == ".jsonl":
            records = []
            for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise InputError(f"{path}: line {k} is not valid JSON") from None
            return _texts_from_records(records, str(path), field, tokenizer)
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
            if isinstance(data, dict):
                data = data.get("data") or data.get("texts") or data.get("rows")
            if not isinstance(data, list):
                raise InputError(f"{path}: expected a JSON list of texts (or an object with a 'data' list)")
            return _texts_from_records(data, str(path), field, tokenizer)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            col = field or ("text" if "text" in table.column_names else None)
            if col is None or col not in table.column_names:
                raise InputError(f"{path}: no column {field or 'text'!r} (columns: {', '.join(table.column_names)})")
            return _texts_from_records(table.column(col).to_pylist(), str(path), None, tokenizer)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    raise InputError(f"{path}: unsupported calibration file type (use {', '.join(LOCAL_SUFFIXES)})")


def read_hub_dataset(spec: str, field: str | None, tokenizer, limit_chars: int) -> list[str]:
    """``preset`` or ``dataset[:config][@split]`` through the datasets library (streamed, bounded)."""
    if spec in PRESETS:
        ds_id, config, split, preset_field = PRESETS[spec]
        field = field or preset_field
    else:
        ds_id, _, split = spec.partition("@")
        ds_id, _, config = ds_id.partition(":")
        config = config or None
        split = split or "train"
        field = field or "text"
    try:
        import datasets

        ds = datasets.load_dataset(ds_id, config, split=split, streaming=True)
        texts, total = [], 0
        for row in ds:
            texts += _texts_from_records([row], spec, field, tokenizer)
            total += len(texts[-1]) if texts else 0
            if total >= limit_chars:
                break
    except InputError:
        raise
    except Exception as e:  # datasets raises connection, FileNotFound, ValueError... all mean "can't get it"
        raise InputError(
            f"--calib {spec}: cannot load dataset {ds_id!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
            "offline? pass a local file or folder instead"
        ) from None
    if not texts:
        raise InputError(f"--calib {spec}: dataset {ds_id!r} gave no text in field {field!r}")
    return texts


def load_texts(
    spec: str | None, field: str | None = None, tokenizer=None, limit_chars: int = 20_000_000
) -> tuple[str, list[str]]:
    """Resolve ``--calib`` to (description, texts)."""
    if spec is None or spec == DEFAULT_NAME:
        return DEFAULT_NAME, [t for _, t in packaged_texts("calib")]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no {', '.join(LOCAL_SUFFIXES)} files inside")
        return str(path), [t for f in files for t in read_local(f, field, tokenizer)]
    if path.is_file():
        return str(path), read_local(path, field, tokenizer)
    if path.suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
        raise InputError(f"{spec}: no such file or directory")
    return spec, read_hub_dataset(spec, field, tokenizer, limit_chars)


def add_bos(tokenizer) -> bool:
    """Whether this tokenizer's model expects a BOS token at the start of a sequence."""
    flag = getattr(tokenizer, "add_bos_token", None)
    if flag is not None:
        return bool(flag) and tokenizer.bos_token_id is not None
    probe = tokenizer("a").input_ids
    return bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id


def tokenize_corpus(texts: list[str], tokenizer) -> torch.Tensor:
    """Documents joined by blank lines, tokenized without special tokens → int64 [n_tokens]."""
    joined = "\n\n".join(t.strip("\n") for t in texts if t.strip())
    ids = tokenizer(joined, add_special_tokens=False).input_ids
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int, bos_id: int | None) -> torch.Tensor:
    """n windows of seqlen tokens. With enough text, distinct non-overlapping chunks chosen at random;
    otherwise random offsets (windows may overlap). BOS, when the model uses one, replaces the first token."""
    body = seqlen - (1 if bos_id is not None else 0)
    if ids.numel() < body:
        raise InputError(f"calibration text has {ids.numel()} tokens, fewer than one sample of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    n_chunks = ids.numel() // body
    if n_chunks >= n:
        starts = torch.randperm(n_chunks, generator=g)[:n] * body
    else:
        starts = torch.randint(0, ids.numel() - body + 1, (n,), generator=g)
    rows = torch.stack([ids[s : s + body] for s in starts.tolist()])
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.int64), rows], dim=1)
    return rows


def sha256_texts(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def build_calibration(
    spec: str | None, tokenizer, n_samples: int, seqlen: int, seed: int, field: str | None = None
) -> CalibrationSet:
    if n_samples < 1 or seqlen < 2:
        raise InputError(f"--calib-samples {n_samples} / --calib-seqlen {seqlen}: need at least 1 sample of 2 tokens")
    source, texts = load_texts(spec, field, tokenizer, limit_chars=n_samples * seqlen * 16)
    ids = tokenize_corpus(texts, tokenizer)
    bos = tokenizer.bos_token_id if add_bos(tokenizer) else None
    windows = sample_windows(ids, n_samples, seqlen, seed, bos)
    tok_hash = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return CalibrationSet(windows, source, sha256_texts(texts), tok_hash, int(ids.numel()))

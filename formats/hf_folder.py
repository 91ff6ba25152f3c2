"""The parts of a Hugging Face model folder every safetensors-based format shares: config.json, tokenizer and
generation files copied from the source, and atomic publication of the folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qconv.errors import InputError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_config(out_dir: Path, config: dict, dtype: torch.dtype) -> None:
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg["torch_dtype"] = dtype_name(dtype)
    cfg.pop("dtype", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(src: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer and generation files that exist in ``src``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        p = src / name
        if p.is_file():
            shutil.copyfile(p, out_dir / name)
            copied.append(name)
    return copied


class AtomicOutput:
    """Build an output (folder or file) under a temporary name next to ``target``; ``commit`` renames it into
    place, ``discard`` removes it. Nothing half-written is ever visible at ``target``."""

    def __init__(self, target: Path, force: bool, is_dir: bool, inputs: list[Path] = ()):
        self.target = target.resolve()
        for p in inputs:
            rp = Path(p).resolve()
            if rp == self.target or self.target in rp.parents or (is_dir and rp.parent == self.target):
                raise InputError(f"{target}: the output would overwrite an input ({p}); choose another --out")
        if self.target.exists() and not force:
            raise InputError(f"{target}: already exists; pass --force to replace it")
        parent = self.target.parent
        if not parent.is_dir():
            raise InputError(f"{target}: parent folder {parent} does not exist")
        self.is_dir = is_dir
        prefix = f".{self.target.name}.qconv-tmp-"
        if is_dir:
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=parent)
            os.close(fd)
            self.path = Path(name)

    def commit(self) -> Path:
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.qconv-old-{os.getpid()}")
            os.replace(self.target, old)
            os.replace(self.path, self.target)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(self.path, self.target)
        if self.is_dir:
            os.chmod(self.target, 0o755)
        else:
            os.chmod(self.target, 0o644)
        return self.target

    def discard(self) -> None:
        if self.path.is_dir():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)

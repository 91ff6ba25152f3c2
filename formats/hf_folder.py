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
    """Build an output (a folder, or one or more files) in a temporary folder next to ``target``; ``commit`` moves
    it into place, ``discard`` removes it. Nothing half-written is ever visible at ``target``.

    Folder outputs: the temporary folder becomes ``target``. File outputs (``is_dir=False``): every file built in
    the temporary folder (the artifact, its splits, its manifest) is renamed into ``target``'s folder.
    """

    def __init__(self, target: Path, force: bool, is_dir: bool, inputs: list[Path] = ()):
        self.target = target.resolve()
        for p in inputs:
            rp = Path(p).resolve()
            if rp == self.target or self.target in rp.parents or (is_dir and rp.parent == self.target):
                raise InputError(f"{target}: the output would overwrite an input ({p}); choose another --out")
        if self.target.exists() and not force:
            raise InputError(f"{target}: already exists; pass --force to replace it")
        if self.target.exists() and not is_dir and self.target.is_dir():
            raise InputError(f"{target}: is a folder; this format writes a file (e.g. --out model.gguf)")
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{target}: cannot create its parent folder ({e.strerror})") from None
        self.is_dir = is_dir
        self.force = force
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.qconv-tmp-", dir=parent))
        self.inputs = [Path(p).resolve() for p in inputs]

    def commit(self) -> Path:
        if self.is_dir:
            _replace(self.path, self.target)
            os.chmod(self.target, 0o755)
            return self.target
        files = sorted(self.path.iterdir())
        # every destination is checked before the first rename: a split output names files beside the target
        for f in files:
            dest = self.target.parent / f.name
            if dest.resolve() in self.inputs:
                raise InputError(f"{dest}: the output would overwrite an input; choose another --out")
            if dest.exists() and not self.force and dest != self.target:
                raise InputError(f"{dest}: already exists; pass --force to replace it")
        for f in files:
            os.chmod(f, 0o644)
            os.replace(f, self.target.parent / f.name)
        self.path.rmdir()
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _replace(src: Path, dest: Path) -> None:
    """Move folder ``src`` to ``dest``, replacing an existing ``dest`` only after the move succeeded."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.qconv-old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(src, dest)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(src, dest)

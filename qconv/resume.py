"""Checkpoints of a running conversion, so that an interrupted run (Ctrl-C, kill, crash) resumes after its last
finished decoder layer (``--resume``).

Next to the output, ``.<name>.qconv-resume/`` holds, per finished layer, everything the pipeline handed the format
writer for that layer (quantized values and dense tensors, in order) plus the calibration activations leaving it.
A resumed run replays the finished layers' writes from there — the writer sees the same calls with the same
values, so the artifact is byte-identical to an uninterrupted run — and continues with the next layer. A
fingerprint of (inputs, settings, qconv version) guards against resuming a different job.

Values are stored without pickle: dataclasses (only qconv's own) become JSON metadata + safetensors tensors.

In place (formats whose every tensor sits where the plan puts it, e.g. GGUF): a layer's checkpoint is only the names
and statistics of its writes. The partial output itself is what survives an interruption — moved into the
checkpoint folder on Ctrl-C or an error, left where it was by a kill — and the resumed run reopens it, so a
checkpoint costs no second copy of the quantized weights (for a fast conversion that copy took as long as the
conversion).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import threading
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qconv.errors import InputError

STATE = "state.json"


def fingerprint(inputs: list[Path], settings: dict, version: str, calibration: dict | None) -> str:
    """sha256 over the input files (name, size, mtime), the artifact-defining settings, qconv's version and the
    calibration set's own digest. Cheap (no hashing of weights) yet changes when any input is replaced."""
    files = []
    for p in sorted(Path(p) for p in inputs):
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps(
        {"inputs": files, "settings": settings, "qconv": version, "calibration": calibration},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# -- value encoding ---------------------------------------------------------------------------------------------


def encode(value, key: str, tensors: dict[str, torch.Tensor]):
    """JSON-able description of ``value``; its tensors go into ``tensors`` under keys derived from ``key``."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {
            "__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
            "fields": {
                f.name: encode(getattr(value, f.name), f"{key}.{f.name}", tensors) for f in dataclasses.fields(value)
            },
        }
    if isinstance(value, dict):
        return {"__dict__": [[k, encode(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {
            "__list__": [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)],
            "tuple": isinstance(value, tuple),
        }
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def decode(desc, tensors: dict[str, torch.Tensor]):
    if isinstance(desc, dict):
        if "__tensor__" in desc:
            return tensors[desc["__tensor__"]]
        if "__dtype__" in desc:
            return getattr(torch, desc["__dtype__"])
        if "__dataclass__" in desc:
            mod, _, qual = desc["__dataclass__"].partition(":")
            if not mod.startswith("qconv."):  # only our own value types are ever rebuilt
                raise InputError(f"resume checkpoint names a foreign type {desc['__dataclass__']!r}")
            cls = importlib.import_module(mod)
            for part in qual.split("."):
                cls = getattr(cls, part)
            return cls(**{k: decode(v, tensors) for k, v in desc["fields"].items()})
        if "__dict__" in desc:
            return {k: decode(v, tensors) for k, v in desc["__dict__"]}
        if "__list__" in desc:
            items = [decode(v, tensors) for v in desc["__list__"]]
            return tuple(items) if desc.get("tuple") else items
    return desc


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"qconv": json.dumps(meta)})
    os.replace(tmp, path)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["qconv"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta


class NoCheckpoints:
    """``--no-checkpoint``: the same interface, keeping nothing (a run that needs the disk space)."""

    dir = None
    in_place = False

    def keep_partial(self, temp_output: Path) -> bool:
        """Nothing is kept: the caller discards the output."""
        return False

    def start(self, resume: bool, temp_output: Path) -> int:
        if resume:
            raise InputError("--resume needs checkpoints: drop --no-checkpoint")
        return 0

    def save_layer(self, i: int, writes: list, hidden, temp_output: Path) -> None:
        """Nothing is kept."""

    def discard(self) -> None:
        """Nothing to remove."""

    def wait(self) -> None:
        """Nothing in flight."""


class ResumeStore:
    """The checkpoint folder of one output. ``start`` decides where the run begins."""

    PARTIAL = "partial"  # the interrupted run's output folder, in place mode

    def __init__(self, target: Path, fp: str, in_place: bool = False):
        target = Path(target).resolve()
        self.dir = target.parent / f".{target.name}.qconv-resume"
        self.fp = fp
        self.in_place = in_place
        self._done = -1
        self._pending: threading.Thread | None = None  # a background commit in flight
        self._error: BaseException | None = None  # its failure, re-raised by wait()

    def start(self, resume: bool, temp_output: Path) -> int:
        """Index of the first layer to compute (0 for a fresh run). With ``resume``, a checkpoint made for a
        different fingerprint is an InputError; without it, any old checkpoint is dropped."""
        state = self._state()
        first = 0
        if resume and state is not None:
            if state.get("fingerprint") != self.fp:
                raise InputError(
                    f"{self.dir}: cannot resume: the interrupted run had other inputs, settings or qconv version; "
                    "run without --resume to start over"
                )
            first = int(state.get("done", -1)) + 1
            stale = state.get("temp_output")
            if self.in_place and first:
                self._reopen(stale, temp_output)
            elif stale and Path(stale).name.startswith(".") and ".qconv-tmp-" in Path(stale).name:
                shutil.rmtree(stale, ignore_errors=True)  # the interrupted run's half-built output
        elif self.dir.exists():
            shutil.rmtree(self.dir)
        if first == 0 and self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._done = first - 1
        self._write_state(first - 1, temp_output, state.get("hidden") if first and state else None)
        return first

    def _reopen(self, partial: str | None, temp_output: Path) -> None:
        """In place: the interrupted run's output folder becomes this run's (empty, just created) one."""
        src = Path(partial) if partial else None
        if src is None or not src.is_dir() or not (src == self.dir / self.PARTIAL or ".qconv-tmp-" in src.name):
            raise InputError(
                f"{self.dir}: cannot resume: the interrupted run's partial output ({partial}) is gone; "
                "run without --resume to start over"
            )
        os.replace(src, temp_output)  # temp_output is an empty folder on the same file system

    def keep_partial(self, temp_output: Path) -> bool:
        """In place, after a failure or interruption with at least one layer checkpointed: move the output folder
        into the checkpoint folder for a later --resume (True); otherwise False (the caller discards it)."""
        with contextlib.suppress(Exception):
            self.wait()  # a background commit's failure only means fewer finished layers
        if not self.in_place or self._done < 0 or not Path(temp_output).is_dir():
            return False
        dest = self.dir / self.PARTIAL
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(temp_output, dest)
        state = self._state() or {}
        self._write_state(int(state.get("done", self._done)), dest, state.get("hidden"))
        return True

    def _state(self) -> dict | None:
        p = self.dir / STATE
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def _write_state(self, done: int, temp_output: Path, hidden: dict | None = None) -> None:
        """The one atomic commit point: ``done`` and the activations file leaving that layer change together."""
        tmp = self.dir / (STATE + ".tmp")
        state = {
            "fingerprint": self.fp,
            "done": done,
            "temp_output": str(temp_output),
            "hidden": hidden,
            "in_place": self.in_place,
        }
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.dir / STATE)

    def save_layer(self, i: int, writes: list, hidden: torch.Tensor | None, temp_output: Path) -> None:
        """Layer ``i`` finished: its writer calls ``writes`` [(kind, name, value, stats row)] and the activations
        leaving it (None without calibration, or after the last layer).

        Activations on a GPU are copied to host memory and written by a background thread while the next layer
        computes (a Llama-3-8B layer's 128×2048 calibration activations are 2 GB: a synchronous write stalled every
        layer); the commit (state.json naming layer i) happens once they are on disk, so an interruption resumes
        from the last layer whose activations are complete. Host-resident activations (CPU runs, possibly a
        memory-mapped file larger than RAM) are written in place, synchronously: a snapshot could double memory."""
        self.wait()
        if self.in_place:  # the values are in the partial output already
            rows = [[kind, name, stats] for kind, name, _value, stats in writes]
            tmp = self.dir / f"layer-{i:05d}.json.tmp"
            tmp.write_text(json.dumps(rows))
            os.replace(tmp, self.dir / f"layer-{i:05d}.json")
        else:
            tensors: dict[str, torch.Tensor] = {}
            desc = encode(writes, "w", tensors)
            _save_atomic(self.dir / f"layer-{i:05d}.safetensors", tensors, {"writes": desc})
        if hidden is not None and hidden.is_cuda:
            snap = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            snap.copy_(hidden)
            self._pending = threading.Thread(target=self._commit_bg, args=(i, snap, temp_output), daemon=False)
            self._pending.start()
        else:
            self._commit(i, hidden, temp_output)

    def _commit(self, i: int, hidden: torch.Tensor | None, temp_output: Path) -> None:
        head = self._save_hidden(hidden, i) if hidden is not None else None
        self._write_state(i, temp_output, head)
        self._done = i
        for old in self.dir.glob("hidden-*.bin"):  # only after the state names the new file
            if head is None or old.name != head["file"]:
                old.unlink(missing_ok=True)

    def _commit_bg(self, i: int, hidden: torch.Tensor, temp_output: Path) -> None:
        try:
            self._commit(i, hidden, temp_output)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by wait()
            self._error = e

    def wait(self) -> None:
        """Finish a background commit; re-raise its error (e.g. a full disk) in the caller."""
        t, self._pending = self._pending, None
        if t is not None:
            t.join()
        err, self._error = self._error, None
        if err is not None:
            raise err

    def _save_hidden(self, hidden: torch.Tensor, layer: int, rows: int = 8) -> dict:
        """Raw bytes, a few samples at a time (activations may be a memory-mapped file larger than RAM), into a file
        named by layer; the state written after it is what makes it current."""
        name = f"hidden-{layer:05d}.bin"
        with open(self.dir / name, "wb") as f:
            for b in range(0, hidden.shape[0], rows):
                f.write(memoryview(hidden[b : b + rows].detach().cpu().contiguous().view(torch.uint8).numpy()))
        return {
            "file": name,
            "layer": layer,
            "shape": list(hidden.shape),
            "dtype": str(hidden.dtype).removeprefix("torch."),
        }

    def load_layer(self, i: int) -> list:
        """Layer ``i``'s writes [(kind, name, value, stats row)]; in place, every value is None (the tensor is in the
        reopened partial output: the writer adopts it)."""
        p = self.dir / f"layer-{i:05d}.{'json' if self.in_place else 'safetensors'}"
        try:
            if self.in_place:
                return [(kind, name, None, stats) for kind, name, stats in json.loads(p.read_text())]
            tensors, meta = _load(p)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{p}: unreadable resume checkpoint ({e}); run without --resume to start over") from None
        return decode(meta["writes"], tensors)

    def load_hidden_into(self, layer: int, hidden: torch.Tensor, rows: int = 8) -> None:
        """Copy the activations saved after ``layer`` into ``hidden`` (same shape and dtype), a few rows at a time."""
        p = self.dir / STATE
        head = (self._state() or {}).get("hidden") or {}
        dtype = str(hidden.dtype).removeprefix("torch.")
        if head.get("layer") != layer or head.get("shape") != list(hidden.shape) or head.get("dtype") != dtype:
            raise InputError(f"{p}: saved activations do not match layer {layer}; run without --resume to start over")
        saved = torch.from_file(str(self.dir / head["file"]), shared=False, size=hidden.numel(), dtype=hidden.dtype)
        saved = saved.view(hidden.shape)
        for b in range(0, hidden.shape[0], rows):
            hidden[b : b + rows] = saved[b : b + rows].to(hidden.device)

    def discard(self) -> None:
        self.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

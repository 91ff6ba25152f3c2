"""A streaming GGUF v3 writer: metadata and every tensor's info are fixed up front, so each file's header is
written first and tensor data is placed at its final (aligned) offset as it arrives, in any order.

Metadata values carry explicit GGUF types (llama.cpp checks them: a u32 where it expects an i32 is an error).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import torch

from qconv.formats.ggml_blocks import BLOCK_SIZE, TYPE_SIZE, GGMLType

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL


class GV(IntEnum):
    """GGUF metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_FMT = {
    GV.UINT8: "B",
    GV.INT8: "b",
    GV.UINT16: "H",
    GV.INT16: "h",
    GV.UINT32: "I",
    GV.INT32: "i",
    GV.FLOAT32: "f",
    GV.BOOL: "?",
    GV.UINT64: "Q",
    GV.INT64: "q",
    GV.FLOAT64: "d",
}


@dataclass(frozen=True)
class KV:
    """One metadata entry; ``etype`` is the element type of an ARRAY."""

    key: str
    vtype: GV
    value: Any
    etype: GV | None = None


def u32(key: str, v: int) -> KV:
    return KV(key, GV.UINT32, int(v))


def i32(key: str, v: int) -> KV:
    return KV(key, GV.INT32, int(v))


def f32(key: str, v: float) -> KV:
    return KV(key, GV.FLOAT32, float(v))


def boolean(key: str, v: bool) -> KV:
    return KV(key, GV.BOOL, bool(v))


def string(key: str, v: str) -> KV:
    return KV(key, GV.STRING, str(v))


def array(key: str, etype: GV, values: Sequence) -> KV:
    return KV(key, GV.ARRAY, list(values), etype)


def _encode_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _encode_value(vtype: GV, value: Any, etype: GV | None = None) -> bytes:
    if vtype == GV.STRING:
        return _encode_string(value)
    if vtype == GV.ARRAY:
        assert etype is not None, "array needs an element type"
        head = struct.pack("<IQ", int(etype), len(value))
        if etype == GV.STRING:
            return head + b"".join(_encode_string(v) for v in value)
        if etype == GV.ARRAY:
            raise ValueError("nested arrays are not written by qconv")
        return head + struct.pack(f"<{len(value)}{_FMT[etype]}", *value)
    return struct.pack("<" + _FMT[vtype], value)


def encode_kv(kv: KV) -> bytes:
    return _encode_string(kv.key) + struct.pack("<I", int(kv.vtype)) + _encode_value(kv.vtype, kv.value, kv.etype)


@dataclass(frozen=True)
class GGUFTensorSpec:
    """A tensor to write: ``shape`` in torch order (outermost first; ggml's ne is its reverse)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        return n // BLOCK_SIZE[self.ggml_type] * TYPE_SIZE[self.ggml_type]


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _tensor_info(spec: GGUFTensorSpec, offset: int) -> bytes:
    ne = list(reversed(spec.shape))
    return (
        _encode_string(spec.name)
        + struct.pack("<I", len(ne))
        + struct.pack(f"<{len(ne)}Q", *ne)
        + struct.pack("<IQ", int(spec.ggml_type), offset)
    )


def check_specs(specs: Iterable[GGUFTensorSpec]) -> None:
    seen = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"tensor {s.name!r} planned twice")
        seen.add(s.name)
        if len(s.name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name {s.name!r} is longer than llama.cpp's {MAX_NAME_BYTES} bytes")
        if not 1 <= len(s.shape) <= 4:
            raise ValueError(f"tensor {s.name!r} has {len(s.shape)} dims (GGUF holds 1–4)")
        if s.shape[-1] % BLOCK_SIZE[s.ggml_type]:
            raise ValueError(
                f"tensor {s.name!r}: row of {s.shape[-1]} is not a multiple of "
                f"{GGMLType(s.ggml_type).name}'s block of {BLOCK_SIZE[s.ggml_type]}"
            )


class GGUFFileWriter:
    """One GGUF file: header, metadata and tensor infos written at open; ``write`` places tensor bytes."""

    def __init__(
        self,
        path: Path,
        kvs: Sequence[KV],
        specs: Sequence[GGUFTensorSpec],
        alignment=DEFAULT_ALIGNMENT,
        keep_data: bool = False,
    ):
        check_specs(specs)
        keys = [kv.key for kv in kvs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"metadata key {next(k for k in keys if keys.count(k) > 1)!r} given twice")
        kvs = list(kvs)
        if alignment != DEFAULT_ALIGNMENT and "general.alignment" not in keys:
            kvs.append(u32("general.alignment", alignment))
        self.path = path
        offsets = {}
        pos = 0
        for s in specs:
            pos = _align(pos, alignment)
            offsets[s.name] = pos
            pos += s.nbytes
        head = bytearray(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(specs), len(kvs)))
        for kv in kvs:
            head += encode_kv(kv)
        for s in specs:
            head += _tensor_info(s, offsets[s.name])
        data_start = _align(len(head), alignment)
        head += b"\0" * (data_start - len(head))
        # keep_data: the file is an interrupted run's partial output of this same plan, whose finished tensors stay
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if keep_data else os.O_TRUNC), 0o644)
        os.pwrite(self._fd, bytes(head), 0)
        # ggml reads every tensor's data padded to the alignment, the last one included
        os.ftruncate(self._fd, data_start + _align(pos, alignment))
        self._where = {s.name: (data_start + offsets[s.name], s) for s in specs}
        self._pending = {s.name for s in specs}
        self._partial: dict[str, int] = {}  # bytes written so far of tensors written in pieces
        self._lock = threading.Lock()
        self._syncing: threading.Thread | None = None

    def write(self, name: str, raw: torch.Tensor, at: int | None = None) -> None:
        """Write tensor ``name``'s bytes; with ``at``, one piece of them starting ``at`` bytes into the tensor (a large
        tensor written in row chunks, possibly out of order and from several threads): the tensor is complete once
        its pieces add up to its size."""
        if name not in self._where:
            raise ValueError(f"tensor {name!r} is not in this file's plan")
        offset, spec = self._where[name]
        data = raw.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        start = 0 if at is None else at
        with self._lock:  # the bookkeeping; the bytes themselves go to disjoint places without it
            if name not in self._pending:
                raise ValueError(f"tensor {name!r} written twice")
            done = self._partial.get(name, 0)
            if start < 0 or start + data.nbytes > spec.nbytes or (at is None and data.nbytes != spec.nbytes):
                raise ValueError(
                    f"tensor {name!r}: {data.nbytes} bytes at {start}, its type and shape need {spec.nbytes}"
                )
            complete = done + data.nbytes >= spec.nbytes
            if complete:
                self._partial.pop(name, None)
                self._pending.discard(name)
            else:
                self._partial[name] = done + data.nbytes
        offset += start
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def mark_written(self, name: str) -> None:
        """Count ``name`` as complete without writing it (its bytes are already in a reopened partial file)."""
        if name not in self._pending or name in self._partial:
            raise ValueError(f"tensor {name!r} is not waiting to be written")
        self._pending.discard(name)

    def sync_in_background(self) -> None:
        """Start writing what has been written so far to disk, in a thread (unless one still is): the final
        ``close`` then has little left to flush (a 600 MB file's fsync took 0.2 s at the end of a 7 s run)."""
        if self._fd is None or (self._syncing is not None and self._syncing.is_alive()):
            return
        self._syncing = threading.Thread(target=_fdatasync_quietly, args=(self._fd,), name="qconv-sync", daemon=True)
        self._syncing.start()

    def _join_sync(self) -> None:
        if self._syncing is not None:
            self._syncing.join()  # before the descriptor closes (its number could be reused)
            self._syncing = None

    def close(self) -> None:
        if self._fd is not None:
            self._join_sync()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} planned tensors never written, e.g. {sorted(self._pending)[0]!r}")

    def abort(self) -> None:
        if self._fd is not None:
            self._join_sync()
            os.close(self._fd)
            self._fd = None


def _fdatasync_quietly(fd: int) -> None:
    # an error here resurfaces in close()'s own fsync
    with contextlib.suppress(OSError):
        os.fdatasync(fd)


def split_names(path: Path, n: int) -> list[Path]:
    """llama.cpp's split naming: model.gguf → model-00001-of-00003.gguf …"""
    if n == 1:
        return [path]
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return [path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


class GGUFWriter:
    """A model written as one GGUF file, or as llama.cpp splits of at most ``max_split_bytes`` of tensor data.

    The first split holds all metadata; every split holds split.no / split.count / split.tensors.count.
    """

    def __init__(
        self,
        path: Path,
        kvs: Sequence[KV],
        specs: Sequence[GGUFTensorSpec],
        max_split_bytes: int | None = None,
        alignment: int = DEFAULT_ALIGNMENT,
        keep_data: bool = False,
    ):
        check_specs(specs)
        groups: list[list[GGUFTensorSpec]] = [[]]
        size = 0
        for s in specs:
            if max_split_bytes and groups[-1] and size + s.nbytes > max_split_bytes:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += s.nbytes
        self.paths = split_names(path, len(groups))
        self._files: list[GGUFFileWriter] = []
        self._file_of: dict[str, GGUFFileWriter] = {}
        n = len(groups)
        try:
            for i, (p, group) in enumerate(zip(self.paths, groups)):
                split_kvs = []
                if n > 1:
                    split_kvs = [
                        KV("split.no", GV.UINT16, i),
                        KV("split.count", GV.UINT16, n),
                        KV("split.tensors.count", GV.INT32, len(specs)),
                    ]
                file_kvs = (list(kvs) if i == 0 else []) + split_kvs
                w = GGUFFileWriter(p, file_kvs, group, alignment, keep_data)
                self._files.append(w)
                for s in group:
                    self._file_of[s.name] = w
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, raw: torch.Tensor, at: int | None = None) -> None:
        if name not in self._file_of:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        self._file_of[name].write(name, raw, at)

    def mark_written(self, name: str) -> None:
        if name not in self._file_of:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        self._file_of[name].mark_written(name)

    def sync_in_background(self) -> None:
        for w in self._files:
            w.sync_in_background()

    def close(self) -> list[Path]:
        for w in self._files:
            w.close()
        return self.paths

    def abort(self) -> None:
        for w in self._files:
            w.abort()

"""Safetensors without surprises: a bounds-checked header parser, lazy per-tensor reads and a streaming writer.

The reader never maps whole files: each ``read`` pulls exactly one tensor's bytes with ``pread`` into fresh memory,
so peak memory follows what the caller holds, not the checkpoint's size. The writer takes a plan of every tensor
up front (names, shapes, dtypes), so it can write each shard's header first and then place tensors at their
final offsets as they arrive, in any order, and fail early on a layout problem instead of after hours of work.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from qconv.errors import InputError

# safetensors dtype names → torch dtypes (only those torch can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

# A header larger than this is not a model header but an attack or garbage (the reference library uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``begin``/``end`` are absolute byte offsets in its file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """One ``.safetensors`` file, header parsed and checked; tensors read on demand.

    Raises InputError naming the file for a short file, an oversized or non-JSON header, unknown dtypes,
    offsets out of bounds (a truncated shard), sizes that disagree with shape×dtype, or overlapping tensors.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._bad(f"file is {size} bytes, too short for a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or n > size - 8:
                    raise self._bad(f"header length {n} does not fit in a {size}-byte file (corrupt header)")
                raw = f.read(n)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror}") from e
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._bad(f"header is not valid JSON ({e.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self._bad("__metadata__ is not an object")
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        data_start = 8 + n
        data_len = size - data_start
        infos: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            infos[name] = self._check_entry(name, entry, data_start, data_len)
        spans = sorted((i.begin, i.end, i.name) for i in infos.values())
        for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise self._bad(f"tensors {n0!r} and {n1!r} overlap")
        self.tensors = infos

    def _bad(self, why: str) -> InputError:
        return InputError(f"{self.path}: not a valid safetensors file: {why}")

    def _check_entry(self, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._bad(f"entry for {name!r} is not an object")
        dt = entry.get("dtype")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if not isinstance(dt, str) or dt not in DTYPES:
            raise self._bad(f"tensor {name!r} has unsupported dtype {dt!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._bad(f"tensor {name!r} has a malformed shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise self._bad(f"tensor {name!r} has malformed data_offsets {offs!r}")
        b, e = offs
        if not 0 <= b <= e:
            raise self._bad(f"tensor {name!r} has inverted data_offsets {offs}")
        if e > data_len:
            raise InputError(
                f"{self.path}: truncated: tensor {name!r} ends at byte {data_start + e} "
                f"but the file has {data_start + data_len} bytes"
            )
        dtype = DTYPES[dt]
        want = math.prod(shape) * dtype_size(dtype)
        if e - b != want:
            raise self._bad(f"tensor {name!r} holds {e - b} bytes, shape {shape} × {dt} needs {want}")
        return TensorInfo(name, dtype, tuple(shape), self.path, data_start + b, data_start + e)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes (pread, no mmap) into a fresh CPU tensor of its dtype and shape."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        with open(info.path, "rb") as f:
            f.seek(info.begin)
            got = f.readinto(memoryview(buf.numpy()))
        if got != info.nbytes:
            raise InputError(f"{info.path}: truncated while reading tensor {info.name!r}")
    return buf.view(info.dtype).reshape(info.shape)


def open_safetensors_files(paths: Iterable[str | os.PathLike]) -> dict[str, TensorInfo]:
    """Parse several files (e.g. a sharded checkpoint) into one name → TensorInfo map; duplicates are an error."""
    out: dict[str, TensorInfo] = {}
    for p in paths:
        sf = SafetensorsFile(p)
        for name, info in sf.tensors.items():
            if name in out:
                raise InputError(f"{p}: tensor {name!r} also appears in {out[name].path.name}")
            out[name] = info
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the writer must receive: name, shape and dtype, known before any work starts."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


def shard_names(n: int, stem: str = "model") -> list[str]:
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into shards of at most ``max_shard_bytes`` (a lone larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _header_bytes(specs: list[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, int] = {}
    pos = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardedSafetensorsWriter:
    """Writes a planned set of tensors into one or more safetensors shards in ``out_dir``.

    Headers go first, so tensors can be written as they are produced, in any order, at their final offsets;
    nothing is buffered beyond the tensor in hand. ``close`` checks every planned tensor arrived and writes
    ``model.safetensors.index.json`` when there is more than one shard.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        specs: list[TensorSpec],
        max_shard_bytes: int = 5 * 1024**3,
        metadata: Mapping[str, str] | None = None,
        stem: str = "model",
    ):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"tensor {dup!r} planned twice")
        if "__metadata__" in names:
            raise ValueError("'__metadata__' is reserved by the safetensors header and cannot name a tensor")
        self.out_dir = Path(out_dir)
        self.stem = stem
        self.shards = plan_shards(specs, max_shard_bytes)
        self.files = shard_names(len(self.shards), stem)
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}
        self._fds: list[int] = []
        for i, shard in enumerate(self.shards):
            head, offsets = _header_bytes(shard, metadata or {"format": "pt"})
            fd = os.open(self.out_dir / self.files[i], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, head, 0)
            total = len(head) + sum(s.nbytes for s in shard)
            os.ftruncate(fd, total)
            for s in shard:
                self._where[s.name] = (i, len(head) + offsets[s.name], s)
        self._pending = set(names)
        self.total_size = sum(s.nbytes for s in specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise ValueError(f"tensor {name!r} is not in the write plan")
        if name not in self._pending:
            raise ValueError(f"tensor {name!r} written twice")
        shard, offset, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, plan says {spec.shape} {spec.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view = memoryview(data)
        while len(view):
            n = os.pwrite(self._fds[shard], view, offset)
            view = view[n:]
            offset += n
        self._pending.discard(name)

    def close(self) -> list[str]:
        """Finish the files; returns the shard file names. Raises if a planned tensor never arrived."""
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if self._pending:
            missing = sorted(self._pending)
            raise RuntimeError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]!r}")
        if len(self.files) > 1:
            weight_map = {s.name: self.files[i] for i, shard in enumerate(self.shards) for s in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

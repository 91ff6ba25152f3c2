"""A bounds-checked GGUF (v2/v3) reader: metadata, tensor infos, and per-tensor reads with torch dequantization.

Every length and offset read from the file is checked against the file's size before it is used, so a corrupt or
hostile header gives a one-line InputError instead of a huge allocation or a read past the end.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qconv.errors import InputError
from qconv.formats.ggml_blocks import (
    BLOCK_SIZE,
    FLOAT_DTYPES,
    SUPPORTED_DEQUANT_TYPES,
    TYPE_SIZE,
    GGMLType,
    dequantize,
)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf spec).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
T_STRING, T_ARRAY = 8, 9
MAX_DIMS = 4
MAX_STRING = 1 << 30


@dataclass(frozen=True)
class GGUFTensorInfo:
    """shape is in torch order (outermost first), i.e. the reverse of ggml's ne[]; offset is absolute."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise InputError(f"{self.path}: corrupt GGUF header: {what} runs past the end of the file")
        b = self.f.read(n)
        if len(b) != n:
            raise InputError(f"{self.path}: truncated GGUF file while reading {what}")
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        if n > MAX_STRING:
            raise InputError(f"{self.path}: corrupt GGUF header: {what} claims {n} bytes")
        raw = self.take(n, what)
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == T_STRING:
            return self.string(what)
        if vtype == T_ARRAY:
            if depth > 2:
                raise InputError(f"{self.path}: corrupt GGUF header: {what} nests arrays too deeply")
            etype = self.unpack("<I", what)
            if depth == 0:
                self.last_etype = etype
            n = self.unpack("<Q", what)
            # Every element takes at least one byte: a count beyond the bytes left is a lie.
            if n > self.size - self.pos:
                raise InputError(f"{self.path}: corrupt GGUF header: {what} claims {n} elements")
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                raw = self.take(n * struct.calcsize(fmt), what)
                return list(struct.unpack(f"<{n}{fmt[1]}", raw))
            return [self.value(etype, what, depth + 1) for _ in range(n)]
        raise InputError(f"{self.path}: corrupt GGUF header: {what} has unknown value type {vtype}")


class GGUFFile:
    """Parsed GGUF file. ``kv`` holds metadata (arrays as lists); ``tensors`` maps names to infos."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                self._parse(_Cursor(f, size, self.path), size)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read: {e.strerror}") from e

    def _parse(self, c: _Cursor, size: int) -> None:
        if c.take(4, "magic") != GGUF_MAGIC:
            raise InputError(f"{self.path}: not a GGUF file (bad magic)")
        self.version = c.unpack("<I", "version")
        if self.version not in (2, 3):
            raise InputError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors = c.unpack("<Q", "tensor count")
        n_kv = c.unpack("<Q", "metadata count")
        if n_tensors > size or n_kv > size:
            raise InputError(f"{self.path}: corrupt GGUF header: {n_tensors} tensors / {n_kv} keys")
        self.kv: dict[str, Any] = {}
        self.kv_types: dict[str, int] = {}
        self.kv_etypes: dict[str, int] = {}  # element type of array values
        for _ in range(n_kv):
            key = c.string("metadata key")
            vtype = c.unpack("<I", f"type of {key}")
            self.kv[key] = c.value(vtype, key)
            self.kv_types[key] = vtype
            if vtype == T_ARRAY:
                self.kv_etypes[key] = c.last_etype
        raw_infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.unpack("<I", f"dims of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise InputError(f"{self.path}: corrupt GGUF header: tensor {name!r} has {n_dims} dims")
            ne = [c.unpack("<Q", f"shape of {name}") for _ in range(n_dims)]
            gtype = c.unpack("<I", f"type of {name}")
            off = c.unpack("<Q", f"offset of {name}")
            raw_infos.append((name, ne, gtype, off))
        align = self.kv.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise InputError(f"{self.path}: corrupt GGUF header: general.alignment {align!r} is not a power of two")
        self.alignment = align
        self.data_offset = -(-c.pos // align) * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, gtype, off in raw_infos:
            if gtype not in TYPE_SIZE:
                raise InputError(f"{self.path}: tensor {name!r} has unsupported ggml type {gtype}")
            n = math.prod(ne)
            if ne[0] % BLOCK_SIZE[gtype]:
                raise InputError(f"{self.path}: tensor {name!r} row of {ne[0]} is not a whole number of blocks")
            nbytes = n // BLOCK_SIZE[gtype] * TYPE_SIZE[gtype]
            start = self.data_offset + off
            if off % align or start + nbytes > size:
                raise InputError(
                    f"{self.path}: truncated or corrupt: tensor {name!r} needs bytes {start}..{start + nbytes} "
                    f"of a {size}-byte file"
                )
            if name in self.tensors:
                raise InputError(f"{self.path}: tensor {name!r} appears twice")
            self.tensors[name] = GGUFTensorInfo(name, tuple(reversed(ne)), gtype, start, nbytes)

    def read_raw(self, name: str) -> torch.Tensor:
        """The tensor's stored bytes, uint8 [nbytes].

        Memory-mapped, privately (writes to the tensor never reach the file), one mapping per call that lives as
        long as the tensor: no anonymous copy of the bytes to fault in and fill (for a 2 GB F16 model that copy was
        a tenth of a Q8_0 conversion), and pages leave the process with the tensor rather than accumulating.
        """
        info = self.tensors[name]
        if info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        page = mmap.ALLOCATIONGRANULARITY
        start = info.offset - info.offset % page
        try:
            with open(self.path, "rb") as f:
                if os.fstat(f.fileno()).st_size < info.offset + info.nbytes:
                    raise InputError(f"{self.path}: truncated while reading tensor {name!r}")
                mm = mmap.mmap(f.fileno(), info.offset + info.nbytes - start, access=mmap.ACCESS_COPY, offset=start)
        except OSError as e:
            raise InputError(f"{self.path}: cannot read tensor {name!r}: {e.strerror}") from e
        return torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset - start)

    def read(self, name: str) -> torch.Tensor:
        """The tensor dequantized to float32, in torch order (shape = reversed ggml ne)."""
        info = self.tensors[name]
        if info.ggml_type not in SUPPORTED_DEQUANT_TYPES:
            raise InputError(f"{self.path}: tensor {name!r} is {info.type_name}, which qconv cannot dequantize yet")
        return dequantize(self.read_raw(name), info.ggml_type, info.n_elements).reshape(info.shape)

    def read_native(self, name: str) -> torch.Tensor:
        """The tensor in torch order: F32, F16 and BF16 in their own dtype (the stored bits, not widened: a float32
        copy of a large F16 tensor is twice its size, and costs a pass over memory), other types as ``read``."""
        info = self.tensors[name]
        dt = FLOAT_DTYPES.get(info.ggml_type)
        if dt is None:
            return self.read(name)
        return self.read_raw(name).view(dt).reshape(info.shape)

"""Dense little-endian bit packing of small unsigned integers into int32 words.

Element k of a row occupies bits [k·bits, (k+1)·bits) of the row's bit stream, word w holding stream bits
[32w, 32w+32), least significant first; an element may straddle two words (3, 5, 6, 7 bits). This is the layout of
compressed-tensors' pack-quantized weights (along the input dim) and of GPTQ's qweight (along the input dim of the
transposed weight). Both directions are vectorized over rows.
"""

from __future__ import annotations

import math

import torch


def packed_words(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


# The int64 intermediates take 8 bytes per element: working on row blocks keeps them to a few MB for any matrix.
ROW_BLOCK = 512


def _by_rows(fn, x: torch.Tensor, *args) -> torch.Tensor:
    if x.shape[0] <= ROW_BLOCK:
        return fn(x, *args)
    return torch.cat([fn(x[r : r + ROW_BLOCK], *args) for r in range(0, x.shape[0], ROW_BLOCK)])


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8/int [rows, n] with values in [0, 2^bits) → int32 [rows, ceil(n·bits/32)]."""
    return _by_rows(_pack_rows, values, bits)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [rows, words] → uint8 [rows, n] (values < 2^bits); inverse of pack_rows."""
    return _by_rows(_unpack_rows, packed, bits, n)


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    rows, n = values.shape
    n_words = packed_words(n, bits)
    v = values.to(torch.int64)
    pad = (-n) % 32
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    start = torch.arange(v.shape[1], device=v.device) * bits
    word = start // 32
    shift = start % 32
    # int64 accumulators: a straddling element's high part is added to the next word below.
    acc = torch.zeros(rows, v.shape[1] // 32 * bits + 1, dtype=torch.int64, device=v.device)
    shifted = v << shift
    acc.scatter_add_(1, word.expand(rows, -1), shifted & 0xFFFFFFFF)
    over = shifted >> 32
    acc.scatter_add_(1, (word + 1).expand(rows, -1), over)
    acc = acc[:, :n_words]
    # Reinterpret the low 32 bits as signed int32.
    return (acc - ((acc & 0x80000000) << 1)).to(torch.int32)


def _unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    rows = packed.shape[0]
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.nn.functional.pad(words, (0, 1))
    start = torch.arange(n, device=packed.device) * bits
    word = start // 32
    shift = start % 32
    lo = words[:, word] >> shift
    hi = words[:, torch.clamp(word + 1, max=words.shape[1] - 1)] << (32 - shift)
    both = torch.where(shift + bits > 32, lo | hi, lo)
    return (both & ((1 << bits) - 1)).to(torch.uint8).reshape(rows, n)

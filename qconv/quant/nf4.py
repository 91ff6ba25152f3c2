"""bitsandbytes' 4-bit blockwise scheme (NF4 / FP4) with double quantization, as pure functions.

The weight [out, in] is flattened row-major and cut into blocks of ``blocksize`` values (a block may span rows).
Each block stores its absmax; each value stores the 4-bit index of the code-table entry nearest to value/absmax.
Double quantization stores the absmax vector itself in 8 bits: its mean (``offset``) is subtracted and the
centred values are quantized blockwise (256 per block) onto bitsandbytes' signed 8-bit dynamic map, each block
keeping a float32 absmax of its own (``nested_absmax``).

    choose_absmax(w)         → float32 [n_blocks]
    quantize_codes(w, …)     → uint8 [numel] codes 0…15 (nearest table entry, bitsandbytes' tie rules)
    double_quantize(absmax)  → (uint8 [n_blocks] codes, float32 [n_nested] absmax, float32 offset)
    dequantize(…)            → float32 weights, as bitsandbytes' dequantize_4bit computes them

Rounding rules follow bitsandbytes 0.50's CPU path exactly (the one this package is tested against):
* 4-bit codes: value · (1/absmax) in float32, clamped to [−1, 1], then the index of the first sorted table
  midpoint ≥ the scaled value (a value exactly on a midpoint takes the lower entry). An all-zero block has
  absmax 0 and codes for 0.
* 8-bit (nested) codes: value·(1/absmax) resolved to one of 65536 evenly spaced points of [−1, 1], each point
  tabulated with its nearest dynamic-map entry (bitsandbytes' CPU lookup table; see quantize_blockwise_8bit).
  bitsandbytes' CUDA kernel searches the map directly, so near those midpoints its nested codes can differ by one
  from the CPU's; any loader dequantizes whichever codes are stored, so the artifact is the same either way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from qconv.errors import InputError
from qconv.quant.tensor import error_stats

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the ones bitsandbytes' kernels accept
NESTED_BLOCKSIZE = 256  # bitsandbytes double-quantizes the absmax in blocks of 256, fixed

# NF4: quantiles of N(0, 1) with equal probability mass per bin, normalised to [−1, 1], exact zero at index 7
# (QLoRA, Dettmers et al. 2023). These float32 values are the format's definition (bitsandbytes' table).
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# bitsandbytes' FP4: sign bit (bit 3), 2 exponent bits with bias 2, 1 mantissa bit; magnitudes of the 3 low bits
# 000…111 are 0, 0.0625 (subnormal), 8, 12, 4, 6, 2, 3 — divided by the largest (12) to span [−1, 1].
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
_NF4_CHUNK = 1 << 22  # values per chunk while choosing codes (bounds the float32 temporaries)
_LUT_SIZE = 65536  # points of [−1, 1] bitsandbytes' CPU 8-bit quantizer resolves values to


def code_table(quant_type: str) -> torch.Tensor:
    """float32 [16]: the value of each 4-bit index. FP4's index 8 is −0.0 (sign bit set), as bitsandbytes'
    dequantization kernels produce it."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    if quant_type == "fp4":
        mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32) / 12.0
        return torch.cat([mags, -mags])
    raise ValueError(f"unknown 4-bit type {quant_type!r}; choose nf4 or fp4")


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """float32 [256]: bitsandbytes' signed 8-bit dynamic map (Dettmers 2015, "8-bit approximations").

    For exponent e = 0 … max_exponent_bits−1 the map holds 2^e evenly spaced means of [0.1, 1] scaled by
    10^(e − max_exponent_bits + 1), with both signs, plus 0 and 1; sorted ascending. Built in float32 as the
    reference builds it, so the values agree bit for bit.
    """
    fraction_bits = total_bits - 1 - max_exponent_bits
    values: list[float] = []
    for e in range(max_exponent_bits):
        n = 2 ** (e + fraction_bits) + 1
        edges = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = (10 ** (-(max_exponent_bits - 1) + e)) * means
        values += scaled.tolist() + (-scaled).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass(frozen=True)
class Bnb4Grid:
    """A bitsandbytes 4-bit grid. quant_type: "nf4" or "fp4"; blocksize: values per absmax; double_quant:
    absmax stored as 8-bit codes + nested absmax + offset; dtype: the model's dtype, recorded in the quant state
    (bitsandbytes' dequantize_4bit returns it); compute_dtype: the dtype the loader's matmul dequantizes to
    (bnb_4bit_compute_dtype; None = dtype)."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    dtype: torch.dtype = torch.bfloat16
    compute_dtype: torch.dtype | None = None

    @property
    def scheme(self) -> str:
        return self.quant_type

    @property
    def name(self) -> str:
        return f"{self.quant_type}-b{self.blocksize}{'-dq' if self.double_quant else ''}"

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.dtype


@dataclass(frozen=True)
class Bnb4Tensor:
    """One weight [out, in] on a Bnb4Grid.

    codes:   uint8 [out, in], indices 0…15 into code_table(grid.quant_type).
    absmax:  float32 [n_blocks], the blocks' true absmax (what the codes were chosen with).
    qabsmax: uint8 [n_blocks] double-quantized absmax codes into dynamic_map(), or None.
    nested_absmax: float32 [ceil(n_blocks/256)], or None.  offset: float32 0-d (the absmax mean), or None.
    """

    grid: Bnb4Grid
    codes: torch.Tensor
    absmax: torch.Tensor
    qabsmax: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def stored_absmax(self) -> torch.Tensor:
        """float32 [n_blocks]: the absmax loaders reconstruct (double-quantized when the grid says so)."""
        if self.qabsmax is None:
            return self.absmax
        return dequantize_absmax(self.qabsmax, self.nested_absmax, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weights bitsandbytes computes: table[code]·absmax in float32, rounded once to ``dtype`` (default:
        the compute dtype, the one loaders' matmuls dequantize to)."""
        g = self.grid
        w = dequantize(self.codes.reshape(-1), self.stored_absmax(), code_table(g.quant_type), g.blocksize)
        return w.reshape(self.shape).to(dtype or self.grid.compute_dtype or self.grid.dtype)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float [n] → [ceil(n/blocksize), blocksize], the last block zero-padded (zeros change no absmax)."""
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(-1, blocksize)


def choose_absmax(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [ceil(numel/blocksize)]: max |w| of each block of the row-major flattened weight."""
    flat = w.reshape(-1)
    out = []
    step = max(blocksize, _NF4_CHUNK // blocksize * blocksize)
    for k in range(0, flat.numel(), step):
        out.append(_blocks(flat[k : k + step].float(), blocksize).abs().amax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, device=w.device)


def _sorted_midpoints(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 [15] midpoints between consecutive sorted entries, int64 [16] table index of each sorted entry).
    Equal entries (FP4's +0 and −0) keep table order, so a value on that tie maps to +0 (index 0)."""
    order = torch.argsort(table, stable=True)
    s = table[order]
    return (s[:-1] + s[1:]) / 2, order


def quantize_codes(w: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    """uint8 [numel]: each value's nearest code-table index, scaled by its block's absmax (see module doc)."""
    flat = w.reshape(-1)
    mids, order = (t.to(flat.device) for t in _sorted_midpoints(code_table(quant_type)))
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    step = max(blocksize, _NF4_CHUNK // blocksize * blocksize)
    for k in range(0, flat.numel(), step):
        chunk = flat[k : k + step].float()
        n = chunk.numel()
        am = absmax[k // blocksize : k // blocksize + -(-n // blocksize)]
        inv = 1.0 / am.clamp(min=1e-38)  # reciprocal then product, in float32, as the reference does
        scaled = (_blocks(chunk, blocksize) * inv.unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
        codes[k : k + n] = order[torch.bucketize(scaled, mids)].to(torch.uint8)
    return codes


@functools.lru_cache(maxsize=1)
def _dynamic_lut() -> torch.Tensor:
    """int64 [65536]: the dynamic-map index bitsandbytes' CPU quantizer assigns to each of 65536 evenly spaced
    points of [−1, 1] (point i = −1 + 2i/65535 in float32): the number of map midpoints strictly below it."""
    table = dynamic_map()
    mids = (table[:-1] + table[1:]) * 0.5
    points = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(mids, points, side="left")


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [n] → (uint8 [n] codes into dynamic_map(), float32 [ceil(n/blocksize)] absmax per block).

    bitsandbytes' CPU quantizer (0.50): value·(1/absmax) in float32, clamped to [−1, 1], mapped to one of 65536
    evenly spaced points (⌊((v+1)·0.5)·65535 + 0.5⌋, each step rounded to float32), whose nearest map entry was
    tabulated (_dynamic_lut). So a value within ~1.5e-5 of a midpoint between two map entries may take the
    farther one — exactly as the reference does. A block of zeros (absmax 0) gets code 0.
    """
    x = x.float().reshape(-1)
    n = x.numel()
    blocks = _blocks(x, blocksize)
    am = blocks.abs().amax(dim=1)
    inv = 1.0 / am
    v = (blocks * inv.unsqueeze(1)).clamp(-1, 1)
    point = ((v + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # truncation (values are ≥ 0)
    point = point.clamp(0, _LUT_SIZE - 1)  # only NaN (0/0) can leave the range; those blocks are zeroed below
    q = _dynamic_lut().to(point.device)[point]
    q[am == 0] = 0
    return q.reshape(-1)[:n].to(torch.uint8), am


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 [n_blocks] → (uint8 [n_blocks] codes, float32 [ceil(n_blocks/256)] nested absmax, float32 0-d
    offset = mean of absmax)."""
    offset = absmax.float().mean()
    q, nested = quantize_blockwise_8bit(absmax.float() - offset, NESTED_BLOCKSIZE)
    return q, nested, offset


def dequantize_absmax(
    qabsmax: torch.Tensor,
    nested_absmax: torch.Tensor,
    offset: torch.Tensor | float,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    quant_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 [n_blocks]: map[q]·nested_absmax[block] + offset, each step rounded to float32 as loaders do."""
    table = dynamic_map() if quant_map is None else quant_map.float()
    am = dequantize(qabsmax, nested_absmax, table, nested_blocksize)
    off = offset if isinstance(offset, torch.Tensor) else torch.tensor(float(offset))
    return am + off.float().to(am.device)


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [numel]: table[code]·absmax[i // blocksize], one float32 product per value (``table``: the code
    values, float32 [16] for 4-bit codes, [256] for the 8-bit absmax codes)."""
    table = table.float()
    c = codes.reshape(-1)
    n = c.numel()
    values = _blocks(table.to(c.device)[c.long()], blocksize)  # [n_blocks, blocksize], a partial block padded
    return (values * absmax.float().to(c.device).unsqueeze(1)).reshape(-1)[:n]


def quantize_weight(w: torch.Tensor, grid: Bnb4Grid, name: str = "weight") -> Bnb4Tensor:
    """Quantize one weight [out, in] onto ``grid``; NaN/Inf weights are an InputError naming ``name``."""
    if grid.quant_type not in QUANT_TYPES:
        raise InputError(f"{name}: 4-bit type {grid.quant_type!r} unknown; choose nf4 or fp4")
    if grid.blocksize not in BLOCKSIZES:
        raise InputError(f"{name}: blocksize {grid.blocksize} not one bitsandbytes accepts ({BLOCKSIZES})")
    if not bool(torch.isfinite(w).all()):
        raise InputError(f"{name}: weight holds NaN/Inf values")
    absmax = choose_absmax(w, grid.blocksize)
    codes = quantize_codes(w, absmax, grid.quant_type, grid.blocksize).reshape(w.shape)
    if grid.double_quant:
        q, nested, offset = double_quantize(absmax)
        qt = Bnb4Tensor(grid, codes, absmax, q, nested, offset)
    else:
        qt = Bnb4Tensor(grid, codes, absmax)
    qt.stats.update(error_stats(qt.dequantize(torch.float32), w))
    return qt

"""FP4 (E2M1) microscaling grids as pure functions: MXFP4 (OCP MX v1.0: 32 elements share an E8M0 power-of-two
scale) and NVFP4 (16 elements share an FP8 E4M3 scale, under one FP32 global scale per tensor).

E2M1 codes are 4-bit: bit 3 the sign, bits 0–2 the magnitude index into (0, 0.5, 1, 1.5, 2, 3, 4, 6). Weights are
float [out, in] with blocks along the input dimension; codes uint8 [out, in]; block scales [out, in / block].

Dequantization, as the loaders compute it:
  MXFP4:  w = e2m1(code) · 2^(e − 127)                    (exact in float32 and in bfloat16)
  NVFP4:  w = e2m1(code) · fl32(s8 / g)                    (s8: the E4M3 block scale, g: the float32 global scale)
and compressed-tensors rounds the result to bfloat16 (its unpacker's dtype): ``FP4Grid.out_dtype``.

Scale choice. The OCP spec's rule takes the shared exponent floor(log2 amax) − 2 (E2M1's largest exponent), which
can leave the top of the grid unused or the scale a factor two from the best one. ``mx_search="mse"`` tries the
exponents around it (and, for NVFP4, the neighbouring E4M3 scales) and keeps, per block, the least squared error,
weighted per input column by an importance vector (calibration mean x²) when given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_MAX = 448.0
FP4_MAX = 6.0
MX_BLOCK = 32
NV_BLOCK = 16


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [...] → float32 values."""
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of float32 x (saturating at ±6), ties to even as compressed-tensors' cast_to_fp4 (and
    the OCP spec) round: thresholds 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 with the even neighbour winning a tie."""
    a = x.abs()
    mag = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75).to(torch.uint8)
        + (a > 1.25).to(torch.uint8)
        + (a >= 1.75).to(torch.uint8)
        + (a > 2.5).to(torch.uint8)
        + (a >= 3.5).to(torch.uint8)
        + (a > 5.0).to(torch.uint8)
    )
    # the sign of an exact zero is kept (compressed-tensors packs −0 with the sign bit)
    return mag | (torch.signbit(x).to(torch.uint8) << 3)


def e8m0_scale(e: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents → float32 2^(e − 127) (e = 0 → 2^−127, a float32 subnormal; e = 255 is not used)."""
    return torch.ldexp(torch.ones_like(e, dtype=torch.float32), e.to(torch.int32) - 127)


@dataclass(frozen=True)
class FP4Grid:
    """kind "mxfp4" (block 32, E8M0 scales) or "nvfp4" (block 16, E4M3 scales + float32 global scale).
    out_dtype: the dtype the target loader's dequantization ends in (compressed-tensors: bfloat16)."""

    kind: str
    out_dtype: torch.dtype = torch.bfloat16

    @property
    def block(self) -> int:
        return MX_BLOCK if self.kind == "mxfp4" else NV_BLOCK

    @property
    def scheme(self) -> str:
        return self.kind

    @property
    def name(self) -> str:
        return f"{self.kind}-b{self.block}"

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.out_dtype


@dataclass(frozen=True)
class FP4Tensor:
    """One weight [out, in] on an FP4Grid.

    codes: uint8 [out, in]; scales: uint8 E8M0 exponents (mxfp4) or float8_e4m3fn (nvfp4), [out, in / block];
    global_scale: float32 [1] (nvfp4) or None.
    """

    grid: FP4Grid
    codes: torch.Tensor
    scales: torch.Tensor
    global_scale: torch.Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def block_scales(self) -> torch.Tensor:
        """float32 [out, in / block]: the effective scale of each block."""
        if self.grid.kind == "mxfp4":
            return e8m0_scale(self.scales)
        return self.scales.float() / self.global_scale.float()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out_f, in_f = self.shape
        b = self.grid.block
        v = e2m1_values(self.codes).reshape(out_f, in_f // b, b) * self.block_scales()[..., None]
        return v.reshape(out_f, in_f).to(self.grid.out_dtype).to(dtype or self.grid.out_dtype)


def _blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    out_f, in_f = w.shape
    if in_f % block:
        raise ValueError(f"{in_f} input columns do not divide into FP4 blocks of {block}")
    return w.float().reshape(out_f, in_f // block, block)


def _block_err(wb: torch.Tensor, scale: torch.Tensor, imp: torch.Tensor | None, out_dtype: torch.dtype):
    """Codes and squared error per block for effective block scales ``scale`` [out, nb]."""
    codes = e2m1_codes(wb / scale[..., None])
    deq = (e2m1_values(codes) * scale[..., None]).to(out_dtype).float()
    err = (deq - wb).square()
    if imp is not None:
        err = err * imp
    return codes, err.sum(dim=-1)


def quantize_mxfp4(
    w: torch.Tensor,
    grid: FP4Grid,
    search: str = "mse",
    importance: torch.Tensor | None = None,
    candidates: tuple[int, ...] = (-1, 0, 1),
) -> FP4Tensor:
    """Weight float [out, in] → MXFP4. ``search="naive"``: the spec's exponent floor(log2 amax) − 2;
    ``"mse"``: the best of that exponent shifted by ``candidates`` per block (least squared error, weighted by
    ``importance`` float [in] when given)."""
    wb = _blocks(w, MX_BLOCK)
    imp = None if importance is None else importance.float().reshape(1, -1, MX_BLOCK).to(wb.device)
    amax = wb.abs().amax(dim=-1)
    # floor(log2 amax) from the float's exponent bits (exact, unlike log2 of a value near a power of two)
    _, ex = torch.frexp(amax)
    naive = torch.where(amax > 0, ex.to(torch.int32) - 1 - 2, torch.full_like(ex, -127, dtype=torch.int32))
    shifts = (0,) if search == "naive" else candidates
    best_e = best_codes = best_err = None
    for s in shifts:
        e = (naive + s + 127).clamp(0, 254)
        codes, err = _block_err(wb, e8m0_scale(e), imp, grid.out_dtype)
        if best_err is None:
            best_e, best_codes, best_err = e, codes, err
        else:
            better = err < best_err
            best_e = torch.where(better, e, best_e)
            best_codes = torch.where(better[..., None], codes, best_codes)
            best_err = torch.where(better, err, best_err)
    qt = FP4Tensor(grid, best_codes.reshape(w.shape), best_e.to(torch.uint8))
    return with_stats(qt, w, importance)


def nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """float32 [1]: FP8_MAX · FP4_MAX / amax(w), the convention of llm-compressor / compressed-tensors (stored as
    weight_global_scale; block scales are divided by it)."""
    amax = w.float().abs().amax().clamp_min(1e-12)
    return (torch.tensor(FP8_MAX * FP4_MAX, dtype=torch.float32) / amax).reshape(1)


def _fp8_step(s8: torch.Tensor, k: int) -> torch.Tensor:
    """The E4M3 value k codes above (k > 0) or below a non-negative one, kept within (0, 448]."""
    bits = s8.view(torch.uint8).to(torch.int32) + k
    bits = bits.clamp(1, 0x7E)  # 0x7E = 448; 0x7F is NaN in e4m3fn
    return bits.to(torch.uint8).view(torch.float8_e4m3fn)


def quantize_nvfp4(
    w: torch.Tensor,
    grid: FP4Grid,
    search: str = "mse",
    importance: torch.Tensor | None = None,
    candidates: tuple[int, ...] = (-2, -1, 0, 1, 2),
) -> FP4Tensor:
    """Weight float [out, in] → NVFP4: global scale as llm-compressor; block scale fp8(amax_b / 6 · g) (naive), or
    with ``search="mse"`` the best of its E4M3 neighbours ``candidates`` codes away, per block."""
    wb = _blocks(w, NV_BLOCK)
    imp = None if importance is None else importance.float().reshape(1, -1, NV_BLOCK).to(wb.device)
    gs = nvfp4_global_scale(w)
    amax = wb.abs().amax(dim=-1)
    naive = (amax / FP4_MAX * gs).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    naive = torch.where(naive.float() == 0, _fp8_step(torch.zeros_like(naive), 1).float(), naive.float()).to(
        torch.float8_e4m3fn
    )
    shifts = (0,) if search == "naive" else candidates
    best_s = best_codes = best_err = None
    for k in shifts:
        s8 = naive if k == 0 else _fp8_step(naive, k)
        codes, err = _block_err(wb, s8.float() / gs, imp, grid.out_dtype)
        if best_err is None:
            best_s, best_codes, best_err = s8, codes, err
        else:
            better = err < best_err
            best_s = torch.where(better, s8.float(), best_s.float()).to(torch.float8_e4m3fn)
            best_codes = torch.where(better[..., None], codes, best_codes)
            best_err = torch.where(better, err, best_err)
    qt = FP4Tensor(grid, best_codes.reshape(w.shape), best_s, gs)
    return with_stats(qt, w, importance)


def with_stats(qt, w: torch.Tensor, importance: torch.Tensor | None = None):
    """Relative squared error (also importance-weighted with ``importance`` [in]) and max |error|."""
    diff = qt.dequantize(torch.float32) - w.float()
    ref = w.float().square()
    qt.stats["rel_mse"] = float(diff.square().sum() / ref.sum().clamp_min(1e-30))
    qt.stats["max_abs_err"] = float(diff.abs().max()) if diff.numel() else 0.0
    if importance is not None:
        imp = importance.float().to(w.device)
        qt.stats["rel_mse_weighted"] = float((diff.square() * imp).sum() / (ref * imp).sum().clamp_min(1e-30))
    return qt


# ---------------------------------------------------------------------------------------------------------------
# GGUF MXFP4 (ggml type 39): the same E8M0 exponent and E2M1 codes, in ggml's block struct.


@dataclass(frozen=True)
class MXFP4BlockTensor:
    """An MXFP4 weight [out, in] as GGML blocks (``fields``: ggml_blocks.MXFP4Fields, row-major blocks)."""

    grid: object  # GGMLGrid(GGMLType.MXFP4)
    fields: object
    shape: tuple[int, int]
    stats: dict[str, float] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        from qconv.formats.ggml_blocks import dequantize_blocks

        return dequantize_blocks(self.fields).reshape(self.shape).to(dtype or torch.float32)


def to_ggml(qt: FP4Tensor, grid) -> MXFP4BlockTensor:
    """An MXFP4 FP4Tensor → GGML MXFP4 blocks (ggml's codes are the same sign + magnitude nibbles)."""
    from qconv.formats.ggml_blocks import MXFP4Fields

    fields = MXFP4Fields(e=qt.scales.reshape(-1).contiguous(), q=qt.codes.reshape(-1, MX_BLOCK).contiguous())
    return MXFP4BlockTensor(grid, fields, qt.shape, dict(qt.stats))

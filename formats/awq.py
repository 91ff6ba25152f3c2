"""AutoAWQ GEMM checkpoints (what AutoAWQ and gptqmodel write; transformers + gptqmodel, vLLM and SGLang load them).

Per quantized linear ``P`` (weight [out, in], 4 bits, group g dividing in; layout: ``qconv.kernels.awq``):
  P.qweight  int32 [in, out/8]   codes packed along out, nibble k of a word = column AWQ_ORDER[k] of its 8
  P.qzeros   int32 [in/g, out/8] zero points, packed the same way
  P.scales   fp16  [in/g, out]
plus ``quantization_config`` (quant_method "awq", version "gemm", zero_point true) in config.json and
quantize_config.json. AutoAWQ's GEMM layout has no other bit width, no symmetric variant and no g_idx.
"""

from __future__ import annotations

import torch

from qconv.errors import InputError
from qconv.formats.base import GridRequest, WriteContext
from qconv.formats.gptq import SCALE_DTYPE, PackedFolderWriter, PackedLinearSource, quantizer_tag
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels import awq as awq_kernel
from qconv.kernels.gptq import as_int32
from qconv.model.source import SafetensorsDirSource
from qconv.quant.tensor import IntGrid, QuantizedTensor

PACK = awq_kernel.PACK


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """uint8/int [rows, cols] (values 0…15, cols % 8 == 0) → int32 [rows, cols/8] in AWQ's nibble order."""
    rows, cols = values.shape
    v = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[..., list(awq_kernel.AWQ_ORDER)]
    shifts = torch.arange(PACK, device=values.device) * awq_kernel.BITS
    return as_int32((v << shifts).sum(-1))


def pack_awq_linear(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """QuantizedTensor → the AWQ tensors of one linear (suffixes without the module prefix)."""
    return {
        "qweight": pack_awq(qt.codes.T.contiguous()),
        "qzeros": pack_awq(qt.zeros.round().to(torch.int64).T.contiguous()),
        "scales": qt.scales.to(SCALE_DTYPE).T.contiguous(),
    }


def awq_kernel_args(t: dict[str, torch.Tensor], group_size: int) -> dict:
    return {"qweight": t["qweight"], "qzeros": t["qzeros"], "scales": t["scales"], "group_size": group_size}


AWQ_GROUPS = (16, 32, 64, 128)  # what gptqmodel's AWQ kernels accept (AutoAWQ's GEMM kernel: 32 … 128)


def suggest_groups(in_features: int) -> str:
    return ", ".join(str(g) for g in AWQ_GROUPS if in_features % g == 0) or f"none of {AWQ_GROUPS}"


class AWQWriter(PackedFolderWriter):
    name = "awq"
    description = "AutoAWQ GEMM safetensors (4-bit, zero points; transformers + gptqmodel, vLLM)"
    supported_bits = (4,)

    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype) -> IntGrid:
        if req.bits != 4:
            raise InputError(f"--bits {req.bits}: --format awq (AutoAWQ GEMM) stores 4-bit weights only")
        if req.symmetric:
            raise InputError("--format awq (AutoAWQ GEMM) stores zero points (zero_point true): pass --asym")
        out_f, in_f = shape
        if req.group_size not in AWQ_GROUPS or in_f % req.group_size:
            raise InputError(
                f"{name}: --format awq needs a group size dividing its {in_f} input columns "
                f"(got {req.group_size}); sizes that work: {suggest_groups(in_f)}"
            )
        if out_f % PACK:
            raise InputError(f"{name}: AWQ packs 8 output rows per word; {out_f} rows is not a multiple of 8")
        return IntGrid(4, req.group_size, False, scale_dtype=SCALE_DTYPE, partial_groups=False)

    def quantized_specs(self, name: str, shape: tuple[int, int], grid: IntGrid) -> list[TensorSpec]:
        out_f, in_f = shape
        n_groups = grid.n_groups(in_f)
        return [
            TensorSpec(f"{name}.qweight", (in_f, out_f // PACK), torch.int32),
            TensorSpec(f"{name}.qzeros", (n_groups, out_f // PACK), torch.int32),
            TensorSpec(f"{name}.scales", (n_groups, out_f), SCALE_DTYPE),
        ]

    def pack_verified(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        tensors = pack_awq_linear(qt)
        self.verifier.check(name, "awq", qt.dequantize(torch.float32), **awq_kernel_args(tensors, qt.grid.group_size))
        return tensors

    def quantization_config(self, ctx: WriteContext) -> dict:
        return awq_config(ctx)


def awq_config(ctx: WriteContext) -> dict:
    """The block AutoAWQ / gptqmodel write for GEMM checkpoints (transformers' AwqConfig reads it)."""
    grids = set(ctx.quantized.values())
    if len(grids) != 1:
        raise InputError(f"--format awq: one grid per checkpoint, got {sorted(g.name for g in grids)}")
    grid = next(iter(grids))
    prov = ctx.provenance
    return {
        "quant_method": "awq",
        "method": "awq",
        "bits": 4,
        "group_size": grid.group_size,
        "zero_point": True,
        "sym": False,
        "version": "gemm",
        "format": "gemm",
        "desc_act": False,
        "lm_head": False,
        "pack_dtype": "int32",
        "modules_to_not_convert": sorted(ctx.ignored) or None,
        "meta": {"quantizer": quantizer_tag(), "method": prov.get("method"), "calibration": prov.get("calibration")},
    }


class AWQSource(PackedLinearSource):
    """An AutoAWQ GEMM checkpoint read as dense weights."""

    suffixes = ("qweight", "qzeros", "scales")

    def __init__(self, raw: SafetensorsDirSource):
        super().__init__(raw)
        version = str(self.qc.get("version") or self.qc.get("format") or "gemm").lower()
        if version != "gemm":
            raise InputError(f"{raw.name}: AWQ version {version!r} is not readable (readable: gemm)")
        if self.bits != 4:
            raise InputError(f"{raw.name}: AWQ GEMM checkpoints are 4-bit; config says bits {self.bits}")
        if self.qc.get("zero_point") is False:
            raise InputError(f"{raw.name}: AWQ GEMM without zero points (zero_point false) is not readable")
        self.group_size = self._int_field("group_size")

    def dequantize(self, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        in_f, words = tensors["qweight"].shape
        n_groups, out_f = tensors["scales"].shape
        if self.group_size <= 0 or in_f % self.group_size or n_groups != in_f // self.group_size:
            raise InputError(
                f"{self.name}: {module}: {n_groups} scale groups do not fit {in_f} input columns in groups of "
                f"{self.group_size}"
            )
        if words * PACK != out_f or tensors["qzeros"].shape != (n_groups, words):
            raise InputError(
                f"{self.name}: {module}: qweight {tuple(tensors['qweight'].shape)} / qzeros "
                f"{tuple(tensors['qzeros'].shape)} do not pack {out_f} output rows"
            )
        return awq_kernel.dequant_reference(**awq_kernel_args(tensors, self.group_size))

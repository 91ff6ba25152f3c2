"""FP8 E4M3 with 2-D block scales in the DeepSeek-V3 layout (transformers' FineGrainedFP8 integration and vLLM's
``fp8`` method read it).

Per quantized linear ``P`` (weight [out, in], b = block edge; dequantization: ``qconv.kernels.fp8``):
  P.weight            float8_e4m3fn [out, in]
  P.weight_scale_inv  float32 [ceil(out/b), ceil(in/b)]   the dequantization multiplier of each b × b block
plus config.json ``quantization_config`` {quant_method "fp8", fmt "e4m3", activation_scheme "dynamic",
weight_block_size [b, b]}. Activations are always scaled per token at run time here (static input scales:
--format safetensors). Loaders that split blocks across tensor-parallel ranks want out and in divisible by b;
transformers' CPU path (it dequantizes at load when no GPU is present) wants that too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qconv.errors import InputError
from qconv.formats.base import GridRequest, WriteContext
from qconv.formats.ct_fp8 import fp8_grid, fp8_tensors
from qconv.formats.folder_writer import SafetensorsFolderWriter
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels.fp8 import dequant_reference
from qconv.model.source import SafetensorsDirSource, TensorSource
from qconv.quant.fp8 import FP8_DTYPE, Fp8Grid, Fp8Tensor

SCALE = "weight_scale_inv"
_HIDDEN = (SCALE, "activation_scale", "input_scale")


def fp8_block_config(grid: Fp8Grid, ignored: list[str]) -> dict:
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [grid.block, grid.block]}  # fmt: skip
    if ignored:
        # transformers' FineGrainedFP8Config reads modules_to_not_convert, vLLM's Fp8Config ignored_layers
        qc["modules_to_not_convert"] = sorted({"lm_head", *ignored})
        qc["ignored_layers"] = sorted(ignored)
    return qc


class Fp8BlockWriter(SafetensorsFolderWriter):
    name = "fp8"
    description = "FP8 E4M3 with 128×128 block scales, DeepSeek-V3 layout (transformers FineGrainedFP8, vLLM)"
    schemes = ("fp8",)

    def __init__(self, out_dir: Path, verifier, max_shard_bytes: int = 5 * 1024**3, target_name: str = ""):
        super().__init__(out_dir, verifier, max_shard_bytes, target_name)

    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype) -> Fp8Grid:
        grid = fp8_grid(name, req, dtype, default_kind="block", kinds=("block",))
        if grid.activations != "dynamic":
            raise InputError(
                f"--opt activations={grid.activations}: --format fp8 (DeepSeek-V3 layout) scales activations "
                "dynamically; static input scales or weight-only FP8: --format safetensors"
            )
        return grid

    def quantized_specs(self, name: str, shape: tuple[int, int], grid: Fp8Grid) -> list[TensorSpec]:
        return [
            TensorSpec(f"{name}.weight", tuple(shape), FP8_DTYPE),
            TensorSpec(f"{name}.{SCALE}", grid.scale_shape(shape), torch.float32),
        ]

    def pack(self, module: str, qt: Fp8Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(qt, Fp8Tensor):
            raise TypeError(f"{module}: --format fp8 stores FP8 weights, got {type(qt).__name__}")
        tensors = fp8_tensors(qt, scale_name=SCALE)
        self.verifier.check(f"{module}.weight", "fp8", qt.dequantize(torch.float32), weight=tensors["weight"],
                            scale=tensors[SCALE], block_size=qt.grid.block_size)  # fmt: skip
        return tensors

    def quantization_config(self, ctx: WriteContext) -> dict:
        grids = set(ctx.quantized.values())
        if len(grids) != 1:
            raise InputError(f"--format fp8: one block size per checkpoint, got {sorted(g.name for g in grids)}")
        return fp8_block_config(next(iter(grids)), ctx.ignored)


# ---------------------------------------------------------------------------------------------------------------
# Reading


class Fp8BlockSource(TensorSource):
    """A ``quant_method: fp8`` checkpoint (DeepSeek-V3 / Qwen3-FP8 / transformers FineGrainedFP8) presented as
    dense weights: ``P.weight`` = fp8 · weight_scale_inv per block in float32, rounded to the model's dtype as
    transformers' loader rounds it; activation scales are dropped."""

    def __init__(self, raw: SafetensorsDirSource):
        self.raw = raw
        self.name = raw.name
        self.config = raw.config
        self.adapter = raw.adapter
        self.input_files = raw.input_files
        qc = raw.config["quantization_config"]
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise InputError(f"{raw.name}: fp8 checkpoints with fmt {fmt!r} are not readable (e4m3 only)")
        bs = qc.get("weight_block_size")
        if bs is not None and (len(bs) != 2 or min(int(b) for b in bs) < 1):
            raise InputError(f"{raw.name}: weight_block_size {bs!r} is not two positive integers")
        self.block_size = (int(bs[0]), int(bs[1])) if bs is not None else None
        self._modules = {n.removesuffix("." + SCALE) for n in raw.names() if n.endswith("." + SCALE)}
        hidden = {f"{m}.{s}" for m in self._modules for s in _HIDDEN}
        self._names = [n for n in raw.names() if n not in hidden]
        self._name_set = set(self._names)

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self._name_set

    def shape(self, name: str) -> tuple[int, ...]:
        return self.raw.shape(name)

    def weights_dtype(self) -> torch.dtype:
        return self.torch_dtype()

    def dequantized(self, module: str) -> torch.Tensor:
        q = self.raw.read(f"{module}.weight")
        scale = self.raw.read(f"{module}.{SCALE}")
        if q.dtype != FP8_DTYPE or q.dim() != 2:
            raise InputError(f"{self.name}: {module}.weight is {q.dtype} {tuple(q.shape)}, expected 2-D float8_e4m3fn")
        block = self.block_size if scale.numel() > 1 else None
        if block is not None:
            want = (-(-q.shape[0] // block[0]), -(-q.shape[1] // block[1]))
            if tuple(scale.shape) != want:
                raise InputError(
                    f"{self.name}: {module}.{SCALE} is {tuple(scale.shape)}, expected {want} for blocks {block}"
                )
        elif scale.numel() > 1:
            raise InputError(f"{self.name}: {module}.{SCALE} has {scale.numel()} values but no weight_block_size")
        return dequant_reference(weight=q, scale=scale, block_size=block).to(self.torch_dtype())

    def _read(self, name: str) -> torch.Tensor:
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and mod in self._modules:
            return self.dequantized(mod)
        return self.raw.read(name)

    def tokenizer_dir(self) -> Path:
        return self.raw.tokenizer_dir()

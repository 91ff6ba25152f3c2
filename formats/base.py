"""What an on-disk format is: it fixes the grid constraints, plans its tensors, packs, verifies and writes.

Formats know nothing of how codes were chosen: they receive QuantizedTensor values (codes, scales, zeros, grid,
group layout) and dense tensors, in the order the pipeline produces them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels.verify import Verifier
from qconv.quant.tensor import IntGrid, QuantizedTensor


@dataclass(frozen=True)
class GridRequest:
    """The user's request for one linear: bits, group size (−1 = per channel), symmetry."""

    bits: int
    group_size: int
    symmetric: bool


@dataclass
class WriteContext:
    """Everything a writer needs besides tensors: the model config to extend, the output dtype of dense tensors
    and scales, the quantized linears' grids and the linears left in full precision."""

    config: dict
    dtype: torch.dtype
    quantized: dict[str, IntGrid]  # module name (no ".weight") → grid
    ignored: list[str]  # linear module names kept dense
    tied: bool


class FormatWriter(ABC):
    name: str = ""
    description: str = ""
    supported_bits: tuple[int, ...] = ()

    def __init__(self, out_dir: Path, verifier: Verifier, max_shard_bytes: int = 5 * 1024**3):
        self.out_dir = out_dir
        self.verifier = verifier
        self.max_shard_bytes = max_shard_bytes

    @abstractmethod
    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype) -> IntGrid:
        """The grid this format stores ``name`` (a linear module) on; InputError if it cannot store the request."""

    @abstractmethod
    def quantized_specs(self, name: str, shape: tuple[int, int], grid: IntGrid) -> list[TensorSpec]:
        """The tensors a quantized linear ``name`` [out, in] becomes on disk."""

    @abstractmethod
    def begin(self, specs: list[TensorSpec], ctx: WriteContext) -> None:
        """Open the output with the full plan of tensors (dense and packed), before any is written."""

    @abstractmethod
    def write_quantized(self, name: str, qt: QuantizedTensor) -> None:
        """Pack, verify against ``qt``'s own dequantization, and write. ``name`` is the module name."""

    @abstractmethod
    def write_dense(self, name: str, tensor: torch.Tensor) -> None:
        """Write a tensor kept in full precision (``name`` is the full tensor name)."""

    @abstractmethod
    def finish(self, ctx: WriteContext) -> list[str]:
        """Complete the files (config, index); returns the names of files written."""

    def abort(self) -> None:
        """Release open files after a failure (the temporary output is removed by the caller)."""

"""What an on-disk format is: it fixes the grid constraints, plans its tensors, packs, verifies and writes.

Formats know nothing of how codes were chosen: they receive QuantizedTensor values (codes, scales, zeros, grid,
group layout) and dense tensors, in the order the pipeline produces them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qconv.errors import InputError
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels.verify import Verifier
from qconv.quant.tensor import Grid, Quantized


@dataclass(frozen=True)
class GridRequest:
    """The user's request for one linear: bits, group size (−1 = per channel), symmetry."""

    bits: int
    group_size: int
    symmetric: bool
    act_order: bool = False  # columns grouped in processing order: the layout stores a g_idx
    scheme: str = "int"  # the method's grid family (Method.scheme): "int", "nf4", "fp8", "mxfp4", …
    options: dict = field(default_factory=dict, compare=False, hash=False)  # the method's --opt values


@dataclass
class WriteContext:
    """Everything a writer needs besides tensors: the model config to extend, the output dtype of dense tensors
    and scales, the quantized tensors' grids and the linears left in full precision."""

    config: dict
    dtype: torch.dtype
    quantized: dict[str, Grid]  # full tensor name → grid
    ignored: list[str]  # linear module names kept dense
    tied: bool
    provenance: dict = field(default_factory=dict)  # qconv version, method, calibration sha256 …
    source: object = None  # the TensorSource (tokenizer files, GGUF metadata of a GGUF input)


@dataclass
class Plan:
    """Every output tensor decided before any work: which grid each quantized tensor gets (``method`` = the
    decoder linears the method quantizes; the others, e.g. GGUF embeddings, get plain RTN on their grid), which
    tensors stay dense, and the format's own write plan (``specs``)."""

    grids: dict[str, Grid]
    method: set[str]
    dense: list[str]
    ignored: list[str]
    specs: list
    notes: dict[str, str] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)  # source tensor name → bytes it takes on disk


class FormatWriter(ABC):
    name: str = ""
    description: str = ""
    supported_bits: tuple[int, ...] = ()
    is_file: bool = False  # the output is one file (e.g. GGUF) rather than a folder
    supports_g_idx: bool = False  # the layout can store act-order column groups (g_idx)
    schemes: tuple[str, ...] = ("int",)  # grid families (Method.scheme) the format can store
    # Every tensor lands at a place the plan fixes, so a resumed run can reopen the interrupted run's partial files
    # (``resuming``) and ``adopt`` the finished layers' tensors instead of writing them again: its checkpoints then
    # record names and statistics only, not a second copy of the quantized weights.
    resumes_in_place: bool = False
    # Settings the writer's constructor takes as keywords, given as --opt KEY=VALUE (qconv.options).
    options: tuple = ()

    def __init__(self, out_dir: Path, verifier: Verifier, max_shard_bytes: int = 5 * 1024**3, target_name: str = ""):
        """``out_dir``: the temporary folder the output is built in; ``target_name``: the final file name of a
        file format (e.g. model-Q4_K_M.gguf)."""
        self.out_dir = out_dir
        self.verifier = verifier
        self.max_shard_bytes = max_shard_bytes
        self.target_name = target_name
        self.resuming = False  # set before ``begin``: out_dir holds an interrupted run's partial files to reopen

    def artifact_path(self) -> Path:
        """What readers open: the folder, or the (first) file of a file format."""
        return self.out_dir / self.target_name if self.is_file else self.out_dir

    def manifest_path(self) -> Path:
        return self.out_dir / (f"{self.target_name}.qconv.json" if self.is_file else "qconv.json")

    def plan(self, source, req: GridRequest, ignore: list[re.Pattern], dtype: torch.dtype) -> Plan:
        """Default plan for folder formats: decoder linears on ``grid_for`` grids (unless ignored), everything
        else dense in ``dtype``, tensors in source order (embeddings, layers, final norm, head)."""
        self.check_scheme(req)
        a = source.adapter
        grids: dict[str, Grid] = {}
        ignored: list[str] = []
        specs: list[TensorSpec] = []
        dense: list[str] = []

        nbytes: dict[str, int] = {}

        def add_dense(name: str) -> None:
            specs.append(TensorSpec(name, source.shape(name), dtype))
            dense.append(name)
            nbytes[name] = specs[-1].nbytes

        add_dense(a.embed)
        for i in range(source.num_layers):
            prefix = a.layer_prefix(i)
            present = set(source.layer_tensor_names(i))
            expected = {f"{prefix}{lin}.weight" for lin in a.linears}
            missing = sorted(expected - present)
            if missing:
                raise InputError(f"{source.name}: missing tensor {missing[0]!r}")
            for lin in a.linears:
                module = prefix + lin
                shape = source.shape(module + ".weight")
                if any(p.search(module) for p in ignore):
                    ignored.append(module)
                    add_dense(module + ".weight")
                    continue
                grid = self.grid_for(module, shape, req, dtype)
                grids[module + ".weight"] = grid
                packed = self.quantized_specs(module, shape, grid)
                specs.extend(packed)
                nbytes[module + ".weight"] = sum(p.nbytes for p in packed)
            for name in sorted(present - expected):
                add_dense(name)
        add_dense(a.final_norm)
        if not source.tied:
            add_dense(a.lm_head)
        return Plan(grids, set(grids), dense, ignored, specs, nbytes=nbytes)

    def check_scheme(self, req: GridRequest) -> None:
        if req.scheme not in self.schemes:
            from qconv.formats.registry import WRITERS

            able = [n for n, w in WRITERS.items() if req.scheme in w.schemes]
            raise InputError(
                f"--format {self.name} cannot store {req.scheme} weights; formats that can: {', '.join(able) or 'none'}"
            )

    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype) -> Grid:
        """The grid this format stores ``name`` (a linear module) on; InputError if it cannot store the request."""
        raise NotImplementedError(f"{self.name} plans its own grids")

    def quantized_specs(self, name: str, shape: tuple[int, int], grid: Grid) -> list[TensorSpec]:
        """The tensors a quantized linear ``name`` [out, in] becomes on disk."""
        raise NotImplementedError(f"{self.name} plans its own tensors")

    @abstractmethod
    def begin(self, plan: Plan, ctx: WriteContext) -> None:
        """Open the output with the full plan of tensors (dense and packed), before any is written."""

    @abstractmethod
    def write_quantized(self, name: str, qt: Quantized) -> None:
        """Pack, verify against ``qt``'s own dequantization, and write. ``name`` is the full tensor name. A writer
        may finish this in the background: ``flush`` waits, and raises what went wrong."""

    def flush(self) -> None:
        """Wait until every tensor handed over so far is written (before a checkpoint records them as done)."""

    @abstractmethod
    def write_dense(self, name: str, tensor: torch.Tensor) -> None:
        """Write a tensor kept in full precision (``name`` is the full tensor name)."""

    def adopt(self, name: str) -> None:
        """Count tensor ``name`` as written: its bytes are already in the reopened partial output (writers with
        ``resumes_in_place`` only)."""
        raise RuntimeError(f"{self.name} does not resume in place: only writers with resumes_in_place adopt tensors")

    @abstractmethod
    def finish(self, ctx: WriteContext) -> list[str]:
        """Complete the files (config, index); returns the names of files written."""

    def abort(self) -> None:
        """Release open files after a failure (the temporary output is removed by the caller)."""

"""compressed-tensors ``pack-quantized`` checkpoints (what llm-compressor writes; transformers and vLLM load them).

Per quantized linear ``P`` (weight [out, in]):
  P.weight_packed      int32 [out, ceil(in·bits/32)]   code = signed value + 2^(bits−1), dense LSB-first along in
  P.weight_scale       dtype [out, G]
  P.weight_zero_point  int32 [ceil(out·bits/32), G]    asymmetric: zero + 2^(bits−1), packed along out
  P.weight_g_idx       int32 [in]                       only with act-order column groups
  P.weight_shape       int64 [2]
plus ``quantization_config`` in config.json (quant_method "compressed-tensors", format "pack-quantized").
Groups must divide the input size exactly: loaders derive in_features from scale columns × group size.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from qconv.errors import InputError
from qconv.formats.base import GridRequest, WriteContext
from qconv.formats.bitpack import pack_rows, packed_words
from qconv.formats.folder_writer import SafetensorsFolderWriter
from qconv.formats.safetensors_io import TensorSpec
from qconv.model.source import SafetensorsDirSource, TensorSource
from qconv.quant.tensor import IntGrid, QuantizedTensor

# The compressed-tensors release whose pack-quantized layout (dense cross-word packing for 3/5/6/7 bits) this
# writer follows; 2/4/8 bits are laid out identically in every release.
CT_LAYOUT_VERSION = "0.12.0"


def suggest_groups(in_features: int) -> str:
    ok = [str(g) for g in (16, 32, 64, 128, 256) if in_features % g == 0]
    return ", ".join(ok + ["-1 (per channel)"])


def pack_ct(qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """QuantizedTensor → the compressed-tensors tensors of one linear (suffixes without the module prefix)."""
    g = qt.grid
    out: dict[str, torch.Tensor] = {
        "weight_packed": pack_rows(qt.codes, g.bits),
        "weight_scale": qt.scales.to(g.scale_dtype),
    }
    if not g.symmetric:
        zero = qt.zeros.round().to(torch.int64)
        # packed along the output dim: pack the transposed [G, out] rows, transpose back
        out["weight_zero_point"] = pack_rows(zero.T.contiguous(), g.bits).T.contiguous()
    if qt.g_idx is not None:
        out["weight_g_idx"] = qt.g_idx.to(torch.int32)
    out["weight_shape"] = torch.tensor(qt.shape, dtype=torch.int64)
    return out


def ct_kernel_args(t: dict[str, torch.Tensor], bits: int, group_size: int) -> dict:
    """Keyword arguments of the ct-int dequantizers (reference and Triton) for one linear's tensors."""
    shape = tuple(int(x) for x in t["weight_shape"].tolist())
    return {
        "packed": t["weight_packed"],
        "scale": t["weight_scale"],
        "zero_packed": t.get("weight_zero_point"),
        "shape": shape,
        "bits": bits,
        "group_size": shape[1] if group_size in (-1, None) else group_size,
        "g_idx": t.get("weight_g_idx"),
    }


def _weights_args(grid: IntGrid, actorder: bool, observer: str) -> dict:
    return {
        "num_bits": grid.bits,
        "type": "int",
        "symmetric": grid.symmetric,
        "group_size": None if grid.group_size == -1 else grid.group_size,
        "strategy": "channel" if grid.group_size == -1 else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": "weight" if actorder else None,
        "observer": observer,
        "observer_kwargs": {},
    }


class CTScheme(ABC):
    """How one grid family (GridRequest.scheme) is stored in compressed-tensors: grid choice, tensors per linear,
    packing + verification, the config group, and dequantization on read. One instance per family in SCHEMES."""

    scheme = ""
    formats: tuple[str, ...] = ()  # the config groups' "format" values this family is read from
    suffixes: tuple[str, ...] = ()  # the tensor suffixes (after the module name) a packed linear has

    @abstractmethod
    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype):
        """The grid this family stores ``name`` [out, in] on; InputError if it cannot store the request."""

    @abstractmethod
    def specs(self, name: str, shape: tuple[int, int], grid) -> list[TensorSpec]:
        """The tensors a quantized linear ``name`` becomes on disk."""

    @abstractmethod
    def pack_verified(self, name: str, qt, verifier) -> dict[str, torch.Tensor]:
        """The tensors of one linear (suffix → tensor), checked by ``verifier`` against ``qt.dequantize``."""

    @abstractmethod
    def group(self, grid, ctx: WriteContext, observer: str) -> tuple[dict, str, dict | None]:
        """(weights args, config-group format, input_activations args or None) for a config group of ``grid``."""

    @abstractmethod
    def dequantize(self, tensors: dict[str, torch.Tensor], weights: dict, fmt: str) -> torch.Tensor:
        """Read side: one linear's stored tensors + its config group → the weight in the scale's dtype."""


class IntScheme(CTScheme):
    scheme = "int"
    formats = ("pack-quantized",)
    suffixes = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")

    def grid_for(self, name, shape, req, dtype) -> IntGrid:
        if req.bits not in CompressedTensorsWriter.supported_bits:
            raise InputError(f"--bits {req.bits}: the safetensors (compressed-tensors) format stores 2–8 bit integers")
        in_f = shape[1]
        if req.group_size != -1 and in_f % req.group_size:
            raise InputError(
                f"{name}: group size {req.group_size} does not divide its {in_f} input columns and compressed-tensors "
                f"cannot store a partial group; group sizes that work: {suggest_groups(in_f)}"
            )
        return IntGrid(req.bits, req.group_size, req.symmetric, scale_dtype=dtype, partial_groups=False)

    def specs(self, name, shape, grid: IntGrid) -> list[TensorSpec]:
        out_f, in_f = shape
        n_groups = grid.n_groups(in_f)
        specs = [
            TensorSpec(f"{name}.weight_packed", (out_f, packed_words(in_f, grid.bits)), torch.int32),
            TensorSpec(f"{name}.weight_scale", (out_f, n_groups), grid.scale_dtype),
        ]
        if not grid.symmetric:
            specs.append(
                TensorSpec(f"{name}.weight_zero_point", (packed_words(out_f, grid.bits), n_groups), torch.int32)
            )
        specs.append(TensorSpec(f"{name}.weight_shape", (2,), torch.int64))
        return specs

    def pack_verified(self, name, qt: QuantizedTensor, verifier) -> dict[str, torch.Tensor]:
        tensors = pack_ct(qt)
        verifier.check(
            name, "ct-int", qt.dequantize(torch.float32), **ct_kernel_args(tensors, qt.grid.bits, qt.grid.group_size)
        )
        return tensors

    def group(self, grid: IntGrid, ctx, observer):
        # compressed-tensors dropped actorder "group" (g_idx): act-order runs with static groups, recorded as "weight"
        return _weights_args(grid, bool(ctx.provenance.get("act_order")), observer), "pack-quantized", None

    def dequantize(self, tensors, weights, fmt) -> torch.Tensor:
        from qconv.kernels.ct_int import dequant_reference

        if weights.get("type") != "int":
            raise InputError(f"weight type {weights.get('type')!r} is not int")
        w = dequant_reference(**ct_kernel_args(tensors, weights["num_bits"], weights.get("group_size") or -1))
        return w.to(tensors["weight_scale"].dtype)


# GridRequest.scheme → how compressed-tensors stores it (other families add their instance here)
SCHEMES: dict[str, CTScheme] = {s.scheme: s for s in (IntScheme(),)}


def scheme_of(grid) -> CTScheme:
    return SCHEMES[getattr(grid, "scheme", "int")]


def quantization_config(ctx: WriteContext, observer: str = "minmax") -> dict:
    """The ``quantization_config`` block: one config group per distinct (weights, format, activations)."""
    by_group: dict[str, tuple[dict, str, dict | None, list[str]]] = {}
    for name, grid in ctx.quantized.items():
        weights, fmt, acts = scheme_of(grid).group(grid, ctx, observer)
        key = json.dumps([weights, fmt, acts], sort_keys=True)
        by_group.setdefault(key, (weights, fmt, acts, []))[3].append(name.removesuffix(".weight"))
    groups = {}
    formats = sorted({v[1] for v in by_group.values()})
    for i, key in enumerate(sorted(by_group)):
        weights, fmt, acts, names = by_group[key]
        targets = ["Linear"] if len(by_group) == 1 else [f"re:^{re.escape(n)}$" for n in sorted(names)]
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weights,
            "input_activations": acts,
            "output_activations": None,
            "format": fmt,
        }
    # lm_head is a Linear even when tied to the embeddings: it must be listed or the "Linear" target catches it
    ignore = sorted({*ctx.ignored, "lm_head"})
    return {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_LAYOUT_VERSION,
    }


class CompressedTensorsWriter(SafetensorsFolderWriter):
    name = "safetensors"
    description = "compressed-tensors pack-quantized safetensors (transformers, vLLM, llm-compressor)"
    supported_bits = (2, 3, 4, 5, 6, 7, 8)
    schemes = ("int",)  # keep in step with SCHEMES

    def __init__(self, out_dir: Path, verifier, max_shard_bytes: int = 5 * 1024**3, target_name: str = "",
                 observer: str = "minmax"):  # fmt: skip
        super().__init__(out_dir, verifier, max_shard_bytes, target_name)
        self.observer = observer

    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype):
        return SCHEMES[req.scheme].grid_for(name, shape, req, dtype)

    def quantized_specs(self, name: str, shape: tuple[int, int], grid) -> list[TensorSpec]:
        return scheme_of(grid).specs(name, shape, grid)

    def pack(self, module: str, qt) -> dict[str, torch.Tensor]:
        return scheme_of(qt.grid).pack_verified(module, qt, self.verifier)

    def quantization_config(self, ctx: WriteContext) -> dict:
        return quantization_config(ctx, self.observer)


# ---------------------------------------------------------------------------------------------------------------
# Reading


class CompressedTensorsSource(TensorSource):
    """A pack-quantized checkpoint presented as dense weights: ``P.weight`` is dequantized on read as the
    loaders do it, (code − zero)·scale rounded to the scale's dtype; every other tensor passes through."""

    def __init__(self, raw: SafetensorsDirSource):
        self.raw = raw
        self.name = raw.name
        self.config = raw.config
        self.adapter = raw.adapter
        self.input_files = raw.input_files
        qc = raw.config["quantization_config"]
        self._groups = list(qc.get("config_groups", {}).values())
        readable = {f: sch for sch in SCHEMES.values() for f in sch.formats}
        # module → (scheme, weights args, format); every packed linear has a weight_scale
        self._modules: dict[str, tuple[CTScheme, dict, str]] = {}
        for n in raw.names():
            if n.endswith(".weight_scale"):
                mod = n[: -len(".weight_scale")]
                weights, fmt = self._group_for(mod, qc.get("format"))
                if fmt not in readable:
                    raise InputError(
                        f"{raw.name}: {mod}: compressed-tensors format {fmt!r} is not readable "
                        f"(readable: {', '.join(sorted(readable))})"
                    )
                self._modules[mod] = (readable[fmt], weights, fmt)
        hidden = {f"{m}.{suf}" for m, (sch, _, _) in self._modules.items() for suf in sch.suffixes}
        self._names = [n for n in raw.names() if n not in hidden]
        self._names += [f"{m}.weight" for m in self._modules if f"{m}.weight" not in self._names]
        self._name_set = set(self._names)

    def _group_for(self, module: str, default_fmt: str | None) -> tuple[dict, str]:
        for g in self._groups:
            for t in g.get("targets", []):
                if t == "Linear" or (t.startswith("re:") and re.match(t[3:], module)) or t == module:
                    return g["weights"], g.get("format") or default_fmt
        raise InputError(f"{self.name}: {module} has quantized weights but no config group targets it")

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self._name_set

    def quantized_modules(self) -> dict[str, tuple[CTScheme, dict, str]]:
        """module name → (its scheme, its config group's weights args, the group's format)."""
        return dict(self._modules)

    def packed(self, module: str) -> dict[str, torch.Tensor]:
        sch = self._modules[module][0]
        return {s: self.raw.read(f"{module}.{s}") for s in sch.suffixes if self.raw.has(f"{module}.{s}")}

    def shape(self, name: str) -> tuple[int, ...]:
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        if mod in self._modules:
            if self.raw.has(f"{mod}.weight_shape"):
                return tuple(int(x) for x in self.raw.read(f"{mod}.weight_shape").tolist())
            return tuple(self.dequantized(mod).shape)
        return self.raw.shape(name)

    def dequantized(self, module: str) -> torch.Tensor:
        sch, weights, fmt = self._modules[module]
        try:
            return sch.dequantize(self.packed(module), weights, fmt)
        except InputError as e:
            raise InputError(f"{self.name}: {module}: {e}") from None

    def _read(self, name: str) -> torch.Tensor:
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        if mod not in self._modules:
            return self.raw.read(name)
        return self.dequantized(mod)

    def tokenizer_dir(self) -> Path:
        return self.raw.tokenizer_dir()


# ---------------------------------------------------------------------------------------------------------------
# Other grid families: each lives in its own module (subclassing CTScheme from here) and is registered below.
def _register(*schemes: CTScheme) -> None:
    for sch in schemes:
        SCHEMES[sch.scheme] = sch
    CompressedTensorsWriter.schemes = tuple(SCHEMES)


from qconv.formats import ct_fp4 as _ct_fp4  # noqa: E402  (it subclasses CTScheme; registers itself when imported first)

_register(*getattr(_ct_fp4, "SCHEMES", ()))

from qconv.formats import ct_fp8 as _ct_fp8  # noqa: E402  (subclasses CTScheme)

_register(*getattr(_ct_fp8, "SCHEMES", ()))

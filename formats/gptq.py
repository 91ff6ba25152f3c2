"""GPTQ checkpoints (what AutoGPTQ / gptqmodel write; transformers + optimum + gptqmodel, vLLM and SGLang load them).

Per quantized linear ``P`` (weight [out, in], G = ceil(in / group) groups; layout: ``qconv.kernels.gptq``):
  P.qweight  int32 [ceil(in·bits/32), out]   codes packed along in
  P.qzeros   int32 [G, ceil(out·bits/32)]    zero points packed along out; v1 ("gptq") stores them minus one
  P.scales   fp16  [G, out]
  P.g_idx    int32 [in]                      group of each input column (act-order groups, else i // group)
plus ``quantization_config`` in config.json and the same block as quantize_config.json (quant_method "gptq").

Also the shared machinery of the AWQ format (formats/awq.py): a folder writer for per-linear packed tensors and a
reader that dequantizes them on read.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from pathlib import Path

import torch

from qconv import __version__
from qconv.errors import InputError
from qconv.formats.base import GridRequest, Plan, WriteContext
from qconv.formats.bitpack import pack_rows, packed_words, unpack_rows
from qconv.formats.folder_writer import SafetensorsFolderWriter
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels import gptq as gptq_kernel
from qconv.model.source import SafetensorsDirSource, TensorSource
from qconv.options import Option
from qconv.quant.tensor import IntGrid, QuantizedTensor

# Scales are float16 in every GPTQ / AWQ loader; methods choose them already rounded to it.
SCALE_DTYPE = torch.float16
GPTQ_BITS = (2, 3, 4, 8)  # what transformers' GPTQConfig / optimum accept (5–7 bits are gptqmodel's "gptq_p")
GPTQ_GROUPS = (-1, 16, 32, 64, 128, 256, 512, 1024)  # what gptqmodel's GPTQ kernels accept
# gptqmodel's default when a method has no dampening (RTN, AWQ): recorded so GPTQConfig validates.
DEFAULT_DAMP = 0.05


# ---------------------------------------------------------------------------------------------------------------
# Packing (pure functions)


def pack_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [out, in] → qweight int32 [ceil(in·bits/32), out] (dense bit stream along in, per column)."""
    return pack_rows(codes, bits).T.contiguous()


def pack_qzeros(zeros: torch.Tensor, bits: int, checkpoint_format: str) -> torch.Tensor:
    """Integer zero points [G, out] (0 … 2^bits−1) → qzeros int32 [G, ceil(out·bits/32)]; v1 stores them minus one
    the way gptqmodel's loaders undo it (qconv.kernels.gptq.shift_qzeros)."""
    packed = pack_rows(zeros.to(torch.int64), bits)
    if checkpoint_format == "gptq":
        packed = gptq_kernel.shift_qzeros(packed, bits, zeros.shape[1], -1)
    return packed


def trivial_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    g = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // g).to(torch.int32)


def pack_gptq(qt: QuantizedTensor, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """QuantizedTensor → the GPTQ tensors of one linear (suffixes without the module prefix)."""
    g = qt.grid
    zeros = qt.zeros.round().to(torch.int64).T.contiguous()  # [G, out]
    g_idx = qt.g_idx.to(torch.int32) if qt.g_idx is not None else trivial_g_idx(qt.shape[1], g.group_size)
    return {
        "qweight": pack_qweight(qt.codes, g.bits),
        "qzeros": pack_qzeros(zeros, g.bits, checkpoint_format),
        "scales": qt.scales.to(SCALE_DTYPE).T.contiguous(),
        "g_idx": g_idx,
    }


def gptq_kernel_args(t: dict[str, torch.Tensor], bits: int, checkpoint_format: str) -> dict:
    """Keyword arguments of the gptq dequantizers (qconv.kernels.gptq) for one linear's tensors."""
    return {
        "qweight": t["qweight"],
        "qzeros": t["qzeros"],
        "scales": t["scales"],
        "g_idx": t["g_idx"],
        "bits": bits,
        "checkpoint_format": checkpoint_format,
    }


# ---------------------------------------------------------------------------------------------------------------
# Writing


class PackedFolderWriter(SafetensorsFolderWriter):
    """An HF folder whose quantized linears become a few packed tensors each (GPTQ, AWQ): sharded safetensors,
    config.json with ``quantization_config``, quantize_config.json, tokenizer files. Subclasses give the grid
    rules (``grid_for``), the tensors (``quantized_specs``, ``pack_verified``) and the config block."""

    config_copy = "quantize_config.json"

    def __init__(self, out_dir: Path, verifier, max_shard_bytes: int = 5 * 1024**3, target_name: str = ""):
        super().__init__(out_dir, verifier, max_shard_bytes, target_name)
        self._damps: list[float] = []  # the GPTQ dampening each tensor finally used (auto-raised ones included)
        self.requested: GridRequest | None = None

    def plan(self, source, req: GridRequest, ignore, dtype) -> Plan:
        self.requested = req
        return super().plan(source, req, ignore, dtype)

    @abstractmethod
    def pack_verified(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """One linear's stored tensors (suffix → tensor), verified against ``qt``'s dequantization."""

    def pack(self, module: str, qt) -> dict[str, torch.Tensor]:
        if not isinstance(qt, QuantizedTensor):
            raise TypeError(f"{module}: --format {self.name} stores integer groups, got {type(qt).__name__}")
        if "gptq_damp" in qt.stats:
            self._damps.append(float(qt.stats["gptq_damp"]))
        return self.pack_verified(module, qt)


def blocks_to_quantize(quantized: list[str], ignored: list[str]) -> list[list[str]] | None:
    """optimum's ``modules_in_block_to_quantize``: None when every decoder linear is quantized; the quantized
    linears (names inside a layer) when the same ones are left dense in every layer; otherwise InputError, since
    optimum replaces linears by their name inside the layer only."""
    if not ignored:
        return None
    rel = re.compile(r"^(.*\.layers\.\d+\.)(.+)$")
    per_layer: dict[str, set[str]] = {}
    for name in quantized:
        m = rel.match(name.removesuffix(".weight"))
        if m:
            per_layer.setdefault(m.group(1), set()).add(m.group(2))
    for name in ignored:
        m = rel.match(name)
        if m:
            per_layer.setdefault(m.group(1), set())
    kinds = {frozenset(v) for v in per_layer.values()}
    if len(kinds) != 1:
        raise InputError(
            f"--ignore {ignored[0]}: transformers' GPTQ loader (optimum) can only keep the same linears of "
            "every layer in full precision; ignore them in every layer (e.g. --ignore 'mlp\\.down_proj')"
        )
    return [sorted(next(iter(kinds)))]


class GPTQWriter(PackedFolderWriter):
    name = "gptq"
    description = "GPTQ safetensors (qweight/qzeros/scales/g_idx; transformers + gptqmodel, vLLM)"
    supported_bits = GPTQ_BITS
    supports_g_idx = True
    options = (
        Option(
            "checkpoint_format",
            str,
            "gptq",
            "gptq (v1: zero points stored minus one, every loader) or gptq_v2 (zeros as they are; gptqmodel)",
            choices=gptq_kernel.FORMATS,
        ),
    )

    def __init__(self, out_dir: Path, verifier, max_shard_bytes: int = 5 * 1024**3, target_name: str = "",
                 checkpoint_format: str = "gptq"):  # fmt: skip
        super().__init__(out_dir, verifier, max_shard_bytes, target_name)
        if checkpoint_format not in gptq_kernel.FORMATS:
            raise InputError(f"--opt checkpoint_format={checkpoint_format}: choose gptq or gptq_v2")
        self.checkpoint_format = checkpoint_format
        self.v1_zero_borrows = 0  # v1 groups whose zero point 0 is stored as a borrow (see qconv.kernels.gptq)

    def plan(self, source, req: GridRequest, ignore, dtype) -> Plan:
        plan = super().plan(source, req, ignore, dtype)
        blocks_to_quantize(list(plan.grids), plan.ignored)  # fail before any work when optimum cannot load it
        return plan

    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype) -> IntGrid:
        if req.bits not in GPTQ_BITS:
            raise InputError(
                f"--bits {req.bits}: --format gptq stores 2, 3, 4 or 8 bits (what transformers and gptqmodel load)"
            )
        if req.group_size not in GPTQ_GROUPS:
            raise InputError(
                f"--group-size {req.group_size}: GPTQ loaders (gptqmodel's kernels) take group sizes "
                f"{', '.join(map(str, GPTQ_GROUPS))}"
            )
        out_f, in_f = shape
        if req.bits == 3 and (in_f % 32 or out_f % 32):
            raise InputError(
                f"{name}: 3-bit GPTQ packs 32 codes per 3 words along both dimensions; its shape {out_f}×{in_f} "
                "is not a multiple of 32"
            )
        return IntGrid(req.bits, req.group_size, req.symmetric, scale_dtype=SCALE_DTYPE, act_order=req.act_order)

    def quantized_specs(self, name: str, shape: tuple[int, int], grid: IntGrid) -> list[TensorSpec]:
        out_f, in_f = shape
        n_groups = grid.n_groups(in_f)
        return [
            TensorSpec(f"{name}.qweight", (packed_words(in_f, grid.bits), out_f), torch.int32),
            TensorSpec(f"{name}.qzeros", (n_groups, packed_words(out_f, grid.bits)), torch.int32),
            TensorSpec(f"{name}.scales", (n_groups, out_f), SCALE_DTYPE),
            TensorSpec(f"{name}.g_idx", (in_f,), torch.int32),
        ]

    def pack_verified(self, name: str, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        tensors = pack_gptq(qt, self.checkpoint_format)
        args = gptq_kernel_args(tensors, qt.grid.bits, self.checkpoint_format)
        self.verifier.check(name, "gptq", qt.dequantize(torch.float32), **args)
        if self.checkpoint_format == "gptq" and not qt.grid.symmetric:
            self.v1_zero_borrows += int((qt.zeros == 0).sum())
        return tensors

    def quantization_config(self, ctx: WriteContext) -> dict:
        qc = gptq_config(ctx, self.requested, self.checkpoint_format, self._damps)
        if self.checkpoint_format == "gptq" and not qc["sym"]:
            qc["meta"]["v1_zero_point_borrows"] = self.v1_zero_borrows
        return qc


def quantizer_tag() -> list[str]:
    return [f"qconv:{__version__}"]


def gptq_config(ctx: WriteContext, req: GridRequest, checkpoint_format: str, damps: list[float]) -> dict:
    """The ``quantization_config`` block gptqmodel writes (its keys and meta), plus the top-level damp_percent /
    static_groups / true_sequential that older AutoGPTQ and optimum configs carry."""
    grids = set(ctx.quantized.values())
    if len(grids) != 1:
        raise InputError(f"--format gptq: one grid per checkpoint, got {sorted(g.name for g in grids)}")
    grid = next(iter(grids))
    prov = ctx.provenance
    act_order = bool(prov.get("act_order"))
    static_groups = bool(prov.get("static_groups", act_order and not req.act_order))
    calibrated_gptq = bool(damps)
    damp = float(prov.get("damp", min(damps))) if calibrated_gptq else DEFAULT_DAMP
    meta = {
        "quantizer": quantizer_tag(),
        "method": prov.get("method"),
        "damp_percent": damp,
        "damp_used_max": max(damps) if damps else None,
        "static_groups": static_groups,
        "true_sequential": calibrated_gptq,
        "act_group_aware": False,
        "calibration": prov.get("calibration"),
    }
    qc = {
        "quant_method": "gptq",
        "method": "gptq",
        "bits": grid.bits,
        "group_size": grid.group_size,
        "desc_act": act_order,
        "sym": grid.symmetric,
        "lm_head": False,
        "format": checkpoint_format,
        "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "static_groups": static_groups,
        "true_sequential": calibrated_gptq,
        "damp_percent": damp,
        "act_group_aware": False,
        "meta": meta,
    }
    blocks = blocks_to_quantize(list(ctx.quantized), ctx.ignored)
    if blocks is not None:
        qc["modules_in_block_to_quantize"] = blocks
        qc["dynamic"] = {f"-:^{re.escape(n)}$": {} for n in sorted(ctx.ignored)}
    return qc


# ---------------------------------------------------------------------------------------------------------------
# Reading


class PackedLinearSource(TensorSource):
    """A folder of packed linears presented as dense weights: ``P.weight`` is dequantized on read as the loaders
    compute it, (code − zero)·scale rounded once to the scales' dtype; every other tensor passes through.
    Subclasses set ``suffixes`` and implement ``dequantize``."""

    suffixes: tuple[str, ...] = ()
    marker = "qweight"  # the suffix every packed linear has

    def __init__(self, raw: SafetensorsDirSource):
        self.raw = raw
        self.name = raw.name
        self.config = raw.config
        self.adapter = raw.adapter
        self.input_files = raw.input_files
        self.qc = raw.config["quantization_config"]
        self.bits = self._int_field("bits")
        self.modules = [n[: -len(self.marker) - 1] for n in raw.names() if n.endswith("." + self.marker)]
        hidden = {f"{m}.{s}" for m in self.modules for s in self.suffixes}
        self._names = [n for n in raw.names() if n not in hidden]
        self._names += [f"{m}.weight" for m in self.modules if f"{m}.weight" not in self._names]
        self._name_set = set(self._names)
        self._module_set = set(self.modules)

    def _int_field(self, key: str) -> int:
        v = self.qc.get(key)
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(f"{self.name}: quantization_config.{key} = {v!r} is not an integer")
        return v

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self._name_set

    def packed(self, module: str) -> dict[str, torch.Tensor]:
        missing = [s for s in self.suffixes if not self.raw.has(f"{module}.{s}")]
        if missing:
            raise InputError(f"{self.name}: {module}: packed tensor {module}.{missing[0]} is missing")
        return {s: self.raw.read(f"{module}.{s}") for s in self.suffixes}

    def _module_of(self, name: str) -> str | None:
        mod = name.removesuffix(".weight") if name.endswith(".weight") else None
        return mod if mod in self._module_set else None

    def shape(self, name: str) -> tuple[int, ...]:
        mod = self._module_of(name)
        if mod is None:
            return self.raw.shape(name)
        return tuple(self.dequantized(mod).shape)

    @abstractmethod
    def dequantize(self, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """One packed linear's tensors → its weight (float32 [out, in])."""

    def dequantized(self, module: str) -> torch.Tensor:
        t = self.packed(module)
        return self.dequantize(module, t).to(t["scales"].dtype)

    def _read(self, name: str) -> torch.Tensor:
        mod = self._module_of(name)
        return self.raw.read(name) if mod is None else self.dequantized(mod)

    def tokenizer_dir(self) -> Path:
        return self.raw.tokenizer_dir()


def declared_format(qc: dict, where: str) -> str:
    """v1 or v2 from the config: ``checkpoint_format`` (optimum, AutoGPTQ) and ``format`` (gptqmodel) must agree."""
    seen = {k: str(qc[k]).lower() for k in ("checkpoint_format", "format") if qc.get(k) is not None}
    values = set(seen.values())
    if len(values) > 1:
        raise InputError(f"{where}: quantization_config says checkpoint_format {seen} — they disagree")
    fmt = values.pop() if values else "gptq"
    if fmt not in gptq_kernel.FORMATS:
        raise InputError(f"{where}: GPTQ checkpoint_format {fmt!r} is not readable (readable: gptq, gptq_v2)")
    return fmt


class GPTQSource(PackedLinearSource):
    """A GPTQ checkpoint read as dense weights. v1 / v2 come from ``checkpoint_format``, checked against the
    stored zero points: symmetric checkpoints have one possible zero point, 2^(bits−1), stored as 2^(bits−1) − 1
    in v1 and as itself in v2, so a file whose zeros are the other version's is refused as mislabelled.
    Asymmetric v1 is read as gptqmodel reads it (whole-word +1, qconv.kernels.gptq)."""

    suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, raw: SafetensorsDirSource):
        super().__init__(raw)
        self.checkpoint_format = declared_format(self.qc, raw.name)
        if self.bits not in GPTQ_BITS:
            raise InputError(f"{raw.name}: GPTQ bits {self.bits} not readable (readable: 2, 3, 4, 8)")
        self.sym = bool(self.qc.get("sym", True))
        self._checked = False

    def check_label(self, module: str, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse a symmetric checkpoint whose stored zero points belong to the other checkpoint_format."""
        if not self.sym:
            return
        out_f = tensors["scales"].shape[1]
        stored = torch.unique(unpack_rows(tensors["qzeros"], self.bits, out_f))
        mid = 1 << (self.bits - 1)
        expect = {"gptq": mid - 1, "gptq_v2": mid}
        want = expect[self.checkpoint_format]
        if stored.numel() == 1 and int(stored) == want:
            return
        other = "gptq_v2" if self.checkpoint_format == "gptq" else "gptq"
        if stored.numel() == 1 and int(stored) == expect[other]:
            raise InputError(
                f"{self.name}: {module}: labelled checkpoint_format {self.checkpoint_format!r} but its symmetric "
                f"zero points are stored as {expect[other]}, which is {other!r}: the file is mislabelled "
                f"(set checkpoint_format and format to {other!r})"
            )
        raise InputError(
            f"{self.name}: {module}: symmetric {self.bits}-bit {self.checkpoint_format!r} zero points must all be "
            f"stored as {want}; found {stored.tolist()[:8]}"
        )

    def dequantize(self, module: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_label(module, tensors)
        in_f = tensors["g_idx"].shape[0]
        if tensors["qweight"].shape != (packed_words(in_f, self.bits), tensors["scales"].shape[1]):
            raise InputError(
                f"{self.name}: {module}.qweight has shape {tuple(tensors['qweight'].shape)}, not the "
                f"{self.bits}-bit packing of {in_f} input columns"
            )
        g = tensors["g_idx"].long()
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= tensors["scales"].shape[0]):
            raise InputError(f"{self.name}: {module}.g_idx points outside its {tensors['scales'].shape[0]} groups")
        return gptq_kernel.dequant_reference(**gptq_kernel_args(tensors, self.bits, self.checkpoint_format))

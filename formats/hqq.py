"""HQQ checkpoints: HQQLinear's encoded state dict per quantized linear (what hqq's ``save_to_safetensors`` and
transformers' HqqConfig serialization write), plus ``quantization_config`` {quant_method: "hqq", quant_config,
skip_modules}.

Per quantized linear ``P`` (see qconv.kernels.hqq for the packing):
  P.W_q            packed codes (uint8, int32 for 3 bits)
  P.scale, P.zero  compute dtype, [G, 1] (axis 1) or [1, G] (axis 0)
  P.shape          int64 [2];  P.nbits, P.group_size, P.axis  int32 scalars
  P.packing, P.unpack_view_dtype, P.compute_dtype  uint8 ASCII strings;  flags as uint8 scalars
The key set and dtypes are exactly those of HQQLinear.state_dict() (encoded). The loader is HQQLinear itself: swap
the linears for ``HQQLinear(None, None, initialize=False)`` and ``model.load_state_dict(sd)`` (its
_load_from_state_dict takes its prefix's keys), as transformers ≤ 4.x did. transformers 5.x (checked: 5.23) has no
pre-quantized HQQ path: from_pretrained reports these tensors as unexpected and leaves plain, randomly initialised
Linears. The reader here dequantizes them for qconv eval / convert / requantization.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qconv.errors import InputError
from qconv.formats.base import GridRequest, Plan, WriteContext
from qconv.formats.folder_writer import SafetensorsFolderWriter
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels.hqq import PACKING, dequant_reference, grouped_shape
from qconv.model.source import SafetensorsDirSource, TensorSource
from qconv.quant.hqq import HQQGrid, HQQTensor
from qconv.quant.tensor import QuantizedTensor

_ROW_MULTIPLE = {"8bit_u8": 1, "4bit_u8": 2, "2bit_u8": 4, "1bit_u8": 8, "3bit_32": 1}
_FLAGS = ("view_as_float", "quant_scale", "quant_zero", "offload_meta", "encoded_state_dict", "stores_quant_config",
          "channel_wise", "optimize", "round_zero")  # fmt: skip


def ascii_tensor(s: str) -> torch.Tensor:
    return torch.tensor([ord(c) for c in s], dtype=torch.uint8)


def ascii_str(t: torch.Tensor) -> str:
    return "".join(chr(int(c)) for c in t.tolist())


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """uint8 codes [R, C] (the grouped shape) → W_q as HQQ's BitPack packs it (rows split into equal chunks)."""
    packing = PACKING[nbits]
    if packing == "8bit_u8":
        return codes.to(torch.uint8).contiguous()
    if packing == "3bit_32":
        rows = -(-codes.shape[0] // 10) * 10
        x = torch.zeros(rows, codes.shape[1], dtype=torch.int32, device=codes.device)
        x[: codes.shape[0]] = codes.to(torch.int32)
        step = rows // 10
        out = torch.zeros(step, codes.shape[1], dtype=torch.int32, device=codes.device)
        for k in range(10):
            out |= x[k * step : (k + 1) * step] << (27 - 3 * k)
        return out
    chunks, width = {"4bit_u8": (2, 4), "2bit_u8": (4, 2), "1bit_u8": (8, 1)}[packing]
    step = codes.shape[0] // chunks
    x = codes.to(torch.int32)
    out = torch.zeros(step, codes.shape[1], dtype=torch.int32, device=codes.device)
    for k in range(chunks):
        out |= x[k * step : (k + 1) * step] << (8 - width - k * width)
    return out.to(torch.uint8)


def packed_shape(grouped: tuple[int, int], nbits: int) -> tuple[tuple[int, int], torch.dtype]:
    packing = PACKING[nbits]
    r, c = grouped
    if packing == "3bit_32":
        return (-(-r // 10), c), torch.int32
    chunks = {"8bit_u8": 1, "4bit_u8": 2, "2bit_u8": 4, "1bit_u8": 8}[packing]
    return (r // chunks, c), torch.uint8


def hqq_tensors(qt: HQQTensor | QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear's HQQLinear state dict (suffix → tensor) for a value on an HQQGrid."""
    g: HQQGrid = qt.grid  # type: ignore[assignment]
    shape = qt.shape
    group = g.group_len(shape)
    if isinstance(qt, HQQTensor):
        scale, zero = qt.scale.to(dtype), qt.zero.to(dtype)
    else:  # integer zeros on contiguous input groups (axis 1): RTN/GPTQ/AWQ onto this format
        if g.axis != 1 or qt.g_idx is not None:
            raise ValueError("only contiguous input-column groups (axis 1) convert to HQQ's layout")
        scale, zero = qt.scales.reshape(-1).to(dtype), qt.zeros.reshape(-1).to(dtype)
    grouped = grouped_shape(shape, group, g.axis)
    codes = qt.codes.reshape(grouped) if g.axis == 1 else qt.codes.reshape(grouped)
    pshape = (-1, 1) if g.axis == 1 else (1, -1)
    packing = PACKING[g.bits]
    out = {
        "W_q": pack_codes(codes, g.bits),
        "nbits": torch.tensor(g.bits, dtype=torch.int32),
        "group_size": torch.tensor(group, dtype=torch.int32),
        "shape": torch.tensor(shape, dtype=torch.int64),
        "scale": scale.reshape(pshape).contiguous(),
        "zero": zero.reshape(pshape).contiguous(),
        "axis": torch.tensor(g.axis, dtype=torch.int32),
        "packing": ascii_tensor(packing),
        "unpack_view_dtype": ascii_tensor("torch.int32" if packing == "3bit_32" else "torch.uint8"),
        "compute_dtype": ascii_tensor(str(dtype)),
    }
    flags = {"encoded_state_dict": 1, "stores_quant_config": 1, "channel_wise": 1, "optimize": 1}
    for f in _FLAGS:
        out[f] = torch.tensor(flags.get(f, 0), dtype=torch.uint8)
    return out


def kernel_args(t: dict[str, torch.Tensor]) -> dict:
    return {
        "W_q": t["W_q"],
        "scale": t["scale"],
        "zero": t["zero"],
        "shape": tuple(int(x) for x in t["shape"].tolist()),
        "nbits": int(t["nbits"]),
        "group_size": int(t["group_size"]),
        "axis": int(t["axis"]),
    }


def quant_config(bits: int, group_size: int | None, axis: int) -> dict:
    """hqq's BaseQuantizeConfig(nbits, group_size, axis) as a dict (what HqqConfig.quant_config holds), with
    round_zero false: qconv's zero points are floats (BaseQuantizeConfig rounds them for 4 bits), and the per-layer
    flags written by hqq_tensors — what HQQLinear.load_state_dict takes as its quant_config — say the same."""
    return {
        "weight_quant_params": {
            "nbits": bits,
            "channel_wise": True,
            "group_size": group_size,
            "optimize": True,
            "round_zero": False,
            "axis": axis,
            "view_as_float": False,
        },
        "scale_quant_params": None,
        "zero_quant_params": None,
        "offload_meta": False,
    }


class HQQWriter(SafetensorsFolderWriter):
    name = "hqq"
    description = "HQQ (HQQLinear state dicts; hqq package / transformers HqqConfig layout)"
    supported_bits = (1, 2, 3, 4, 5, 6, 8)
    schemes = ("int",)

    def __init__(self, out_dir: Path, verifier, max_shard_bytes: int = 5 * 1024**3, target_name: str = ""):
        super().__init__(out_dir, verifier, max_shard_bytes, target_name)
        self._dtype = torch.float16

    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype) -> HQQGrid:
        if req.bits not in self.supported_bits:
            raise InputError(f"--bits {req.bits}: HQQ stores {', '.join(map(str, self.supported_bits))} bits")
        if req.symmetric:
            raise InputError("--format hqq stores zero points: use --asym")
        axis = int(req.options.get("axis", 1))
        grid = HQQGrid(req.bits, req.group_size, False, scale_dtype=dtype, partial_groups=False, axis=axis)
        group = grid.group_len(shape)
        n = shape[0] * shape[1]
        dim = shape[1] if axis == 1 else shape[0]
        if (axis == 1 and dim % group) or n % group or (req.group_size != -1 and group % 8):
            raise InputError(
                f"{name}: group size {group} must be a multiple of 8 dividing its {dim} "
                f"{'input' if axis == 1 else 'output'} features (axis {axis})"
            )
        rows = grouped_shape(shape, group, axis)[0]
        mult = _ROW_MULTIPLE[PACKING[req.bits]]
        if rows % mult:
            raise InputError(f"{name}: {req.bits}-bit HQQ packing needs the {rows} packed rows to divide by {mult}")
        return grid

    def quantized_specs(self, name: str, shape: tuple[int, int], grid: HQQGrid) -> list[TensorSpec]:
        group = grid.group_len(shape)
        pshape, pdtype = packed_shape(grouped_shape(shape, group, grid.axis), grid.bits)
        g = shape[0] * shape[1] // group
        sshape = (g, 1) if grid.axis == 1 else (1, g)
        packing = PACKING[grid.bits]
        specs = [
            TensorSpec(f"{name}.W_q", pshape, pdtype),
            TensorSpec(f"{name}.nbits", (), torch.int32),
            TensorSpec(f"{name}.group_size", (), torch.int32),
            TensorSpec(f"{name}.shape", (2,), torch.int64),
            TensorSpec(f"{name}.scale", sshape, grid.scale_dtype),
            TensorSpec(f"{name}.zero", sshape, grid.scale_dtype),
            TensorSpec(f"{name}.axis", (), torch.int32),
            TensorSpec(f"{name}.packing", (len(packing),), torch.uint8),
            TensorSpec(
                f"{name}.unpack_view_dtype", (len("torch.int32" if grid.bits == 3 else "torch.uint8"),), torch.uint8
            ),  # fmt: skip
            TensorSpec(f"{name}.compute_dtype", (len(str(grid.scale_dtype)),), torch.uint8),
        ]
        specs += [TensorSpec(f"{name}.{f}", (), torch.uint8) for f in _FLAGS]
        return specs

    def begin(self, plan: Plan, ctx: WriteContext) -> None:
        self._dtype = ctx.dtype
        super().begin(plan, ctx)

    def pack(self, module: str, qt) -> dict[str, torch.Tensor]:
        tensors = hqq_tensors(qt, qt.grid.scale_dtype)
        self.verifier.check(module, "hqq", qt.dequantize(torch.float32), **kernel_args(tensors))
        return tensors

    def quantization_config(self, ctx: WriteContext) -> dict:
        grids = {(g.bits, g.group_size, g.axis) for g in ctx.quantized.values()}
        if len(grids) > 1:
            raise RuntimeError(f"HQQ config holds one setting; got {sorted(grids)}")
        bits, group, axis = next(iter(grids)) if grids else (4, 64, 1)
        skip = sorted({"lm_head", *(m.split(".")[-1] for m in ctx.ignored)})
        return {
            "quant_method": "hqq",
            "quant_config": quant_config(bits, None if group == -1 else group, axis),
            "skip_modules": skip,
        }


_SUFFIXES = ("W_q", "nbits", "group_size", "shape", "scale", "zero", "axis", "packing", "unpack_view_dtype",
             "compute_dtype", "bias", *_FLAGS)  # fmt: skip


class HQQSource(TensorSource):
    """An HQQ checkpoint presented as dense weights: ``P.weight`` is HQQLinear's dequantization of P's tensors."""

    def __init__(self, raw: SafetensorsDirSource):
        self.raw = raw
        self.name = raw.name
        self.config = raw.config
        self.adapter = raw.adapter
        self.input_files = raw.input_files
        self._modules = [n[: -len(".W_q")] for n in raw.names() if n.endswith(".W_q")]
        hidden = {f"{m}.{s}" for m in self._modules for s in _SUFFIXES if s != "bias"}
        self._names = [n for n in raw.names() if n not in hidden] + [f"{m}.weight" for m in self._modules]
        self._mods = set(self._modules)
        self._name_set = set(self._names)

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self._name_set

    def _module(self, name: str) -> str | None:
        mod = name.removesuffix(".weight") if name.endswith(".weight") else None
        return mod if mod in self._mods else None

    def shape(self, name: str) -> tuple[int, ...]:
        mod = self._module(name)
        if mod is None:
            return self.raw.shape(name)
        return tuple(int(x) for x in self.raw.read(f"{mod}.shape").tolist())

    def _read(self, name: str) -> torch.Tensor:
        mod = self._module(name)
        if mod is None:
            return self.raw.read(name)
        t = {s: self.raw.read(f"{mod}.{s}") for s in ("W_q", "nbits", "group_size", "shape", "scale", "zero", "axis")}
        args = kernel_args(t)
        if args["nbits"] not in PACKING or args["axis"] not in (0, 1) or args["group_size"] < 1:
            raise InputError(f"{self.name}: {mod}: unsupported HQQ settings {args['nbits']} bits, axis {args['axis']}")
        out_f, in_f = args["shape"]
        if (out_f * in_f) % args["group_size"]:
            raise InputError(f"{self.name}: {mod}: group size {args['group_size']} does not divide {args['shape']}")
        return dequant_reference(**args).to(t["scale"].dtype)

    def tokenizer_dir(self) -> Path:
        return self.raw.tokenizer_dir()

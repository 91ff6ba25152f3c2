"""bitsandbytes 4-bit checkpoints (NF4 / FP4), laid out as transformers saves a ``load_in_4bit`` model.

Per quantized linear ``P`` (weight [out, in]; layout and dequantization: ``qconv.kernels.bnb4``):
  P.weight                                  uint8 [ceil(out·in/2), 1]  packed codes, even element in the high nibble
  P.weight.absmax                           uint8 [nb] (double quant) or float32 [nb]
  P.weight.quant_map                        float32 [16]
  P.weight.nested_absmax                    float32 [ceil(nb/256)]       double quant only
  P.weight.nested_quant_map                 float32 [256]                double quant only
  P.weight.quant_state.bitsandbytes__nf4    uint8 [k]  JSON: quant_type, blocksize, dtype, shape (+ nested_blocksize,
                                            nested_dtype, nested_offset); "…__fp4" for FP4
plus config.json ``quantization_config`` as transformers' BitsAndBytesConfig writes it (quant_method
"bitsandbytes", load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype, …).
The block size is not part of BitsAndBytesConfig: loaders read it from each linear's quant state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qconv.errors import InputError
from qconv.formats.base import GridRequest, WriteContext
from qconv.formats.folder_writer import SafetensorsFolderWriter
from qconv.formats.hf_folder import dtype_name
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels.bnb4 import pack_nibbles
from qconv.model.source import SafetensorsDirSource, TensorSource
from qconv.options import Option
from qconv.quant.nf4 import (
    BLOCKSIZES,
    NESTED_BLOCKSIZE,
    Bnb4Grid,
    Bnb4Tensor,
    code_table,
    dynamic_map,
    quantize_codes,
)

STATE_PREFIX = "weight.quant_state.bitsandbytes__"
# The quant state's JSON holds nested_offset, a float whose repr varies in length; the planned tensor is sized for
# the longest repr and the JSON padded with spaces (JSON allows trailing whitespace; bitsandbytes' json.loads
# reads it unchanged).
_LONGEST_FLOAT = -1.2345678901234567e-300
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _n_blocks(shape: tuple[int, int], blocksize: int) -> int:
    return -(-(shape[0] * shape[1]) // blocksize)


def quant_state(grid: Bnb4Grid, shape: tuple[int, int], offset: float | None) -> dict:
    """The non-tensor quant state, in bitsandbytes' key order (QuantState.as_dict)."""
    state = {"quant_type": grid.quant_type, "blocksize": grid.blocksize, "dtype": dtype_name(grid.dtype),
             "shape": [int(shape[0]), int(shape[1])]}  # fmt: skip
    if grid.double_quant:
        state |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                  "nested_offset": 0.0 if offset is None else float(offset)}  # fmt: skip
    return state


def state_bytes(grid: Bnb4Grid, shape: tuple[int, int]) -> int:
    """Planned size of the quant-state tensor (the longest JSON any offset gives)."""
    return len(json.dumps(quant_state(grid, shape, _LONGEST_FLOAT)).encode())


def encode_state(state: dict, size: int) -> torch.Tensor:
    raw = json.dumps(state).encode()
    if len(raw) > size:
        raise ValueError(f"quant state JSON of {len(raw)} bytes exceeds its planned {size}")
    return torch.frombuffer(bytearray(raw + b" " * (size - len(raw))), dtype=torch.uint8)


def stored_quant_map(quant_type: str) -> torch.Tensor:
    """float32 [16] as bitsandbytes stores it: FP4's sign-only code 8 written as +0.0 (its get_4bit_type table)."""
    t = code_table(quant_type)
    return torch.where(t == 0, torch.zeros_like(t), t)


def pack_bnb4(qt: Bnb4Tensor) -> dict[str, torch.Tensor]:
    """Bnb4Tensor → one linear's tensors, keyed by suffix after the module name ("weight", "weight.absmax", …)."""
    g = qt.grid
    # bitsandbytes pads an odd count with the code of 0.0
    zero_code = int(quantize_codes(torch.zeros(1), torch.zeros(1), g.quant_type, g.blocksize)[0])
    out = {"weight": pack_nibbles(qt.codes, pad=zero_code)}
    if g.double_quant:
        out["weight.absmax"] = qt.qabsmax.to(torch.uint8)
        out["weight.quant_map"] = stored_quant_map(g.quant_type)
        out["weight.nested_absmax"] = qt.nested_absmax.float()
        out["weight.nested_quant_map"] = dynamic_map()
        offset = float(qt.offset)
    else:
        out["weight.absmax"] = qt.absmax.float()
        out["weight.quant_map"] = stored_quant_map(g.quant_type)
        offset = None
    out[STATE_PREFIX + g.quant_type] = encode_state(quant_state(g, qt.shape, offset), state_bytes(g, qt.shape))
    return out


def kernel_args(t: dict[str, torch.Tensor], state: dict) -> dict:
    """Keyword arguments of the bnb4 dequantizers (qconv.kernels.bnb4) for one linear's tensors + quant state."""
    args = {
        "packed": t["weight"],
        "absmax": t["weight.absmax"],
        "quant_map": t["weight.quant_map"],
        "shape": tuple(int(x) for x in state["shape"]),
        "blocksize": int(state["blocksize"]),
    }
    if "nested_offset" in state:
        args |= {
            "nested_absmax": t["weight.nested_absmax"],
            "nested_quant_map": t["weight.nested_quant_map"],
            "nested_offset": float(state["nested_offset"]),
            "nested_blocksize": int(state.get("nested_blocksize", NESTED_BLOCKSIZE)),
        }
    return args


def bnb_config(grid: Bnb4Grid, skip: list[str]) -> dict:
    """``quantization_config`` with every key transformers' BitsAndBytesConfig.to_dict() writes."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": skip,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": grid.quant_type,
        "bnb_4bit_use_double_quant": grid.double_quant,
        "bnb_4bit_compute_dtype": dtype_name(grid.compute_dtype or grid.dtype),
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


class BnbWriter(SafetensorsFolderWriter):
    name = "bnb"
    description = "bitsandbytes 4-bit safetensors (NF4/FP4, double quant; transformers + bitsandbytes load it)"
    schemes = ("nf4", "fp4")
    options = (
        Option(
            "compute_dtype",
            str,
            "auto",
            "bnb_4bit_compute_dtype loaders run the matmuls in (auto: --dtype)",
            choices=("auto", *DTYPES),
        ),  # fmt: skip
    )

    def __init__(self, out_dir: Path, verifier, max_shard_bytes: int = 5 * 1024**3, target_name: str = "",
                 compute_dtype: str = "auto"):  # fmt: skip
        super().__init__(out_dir, verifier, max_shard_bytes, target_name)
        if compute_dtype != "auto" and compute_dtype not in DTYPES:
            raise InputError(f"--opt compute_dtype={compute_dtype}: choose auto, {', '.join(DTYPES)}")
        self.compute_dtype = compute_dtype

    def grid_for(self, name: str, shape: tuple[int, int], req: GridRequest, dtype: torch.dtype) -> Bnb4Grid:
        blocksize = int(req.options.get("blocksize", 64))
        if blocksize not in BLOCKSIZES:
            raise InputError(f"--opt blocksize={blocksize}: bitsandbytes accepts {', '.join(map(str, BLOCKSIZES))}")
        compute = dtype if self.compute_dtype == "auto" else DTYPES[self.compute_dtype]
        return Bnb4Grid(req.scheme, blocksize, bool(req.options.get("double_quant", True)), dtype, compute)

    def quantized_specs(self, name: str, shape: tuple[int, int], grid: Bnb4Grid) -> list[TensorSpec]:
        n = shape[0] * shape[1]
        nb = _n_blocks(shape, grid.blocksize)
        w = f"{name}.weight"
        specs = [TensorSpec(w, (-(-n // 2), 1), torch.uint8)]
        if grid.double_quant:
            specs += [
                TensorSpec(f"{w}.absmax", (nb,), torch.uint8),
                TensorSpec(f"{w}.quant_map", (16,), torch.float32),
                TensorSpec(f"{w}.nested_absmax", (-(-nb // NESTED_BLOCKSIZE),), torch.float32),
                TensorSpec(f"{w}.nested_quant_map", (256,), torch.float32),
            ]
        else:
            specs += [TensorSpec(f"{w}.absmax", (nb,), torch.float32),
                      TensorSpec(f"{w}.quant_map", (16,), torch.float32)]  # fmt: skip
        specs.append(TensorSpec(f"{name}.{STATE_PREFIX}{grid.quant_type}", (state_bytes(grid, shape),), torch.uint8))
        return specs

    def pack(self, module: str, qt: Bnb4Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(qt, Bnb4Tensor):
            raise TypeError(f"{module}: --format bnb stores NF4/FP4 blocks, got {type(qt).__name__}")
        tensors = pack_bnb4(qt)
        state = quant_state(qt.grid, qt.shape, None if qt.offset is None else float(qt.offset))
        self.verifier.check(f"{module}.weight", "bnb4", qt.dequantize(torch.float32), **kernel_args(tensors, state))
        return tensors

    def quantization_config(self, ctx: WriteContext) -> dict:
        grids = set(ctx.quantized.values())
        if len(grids) != 1:
            raise InputError(f"--format bnb: one grid per checkpoint, got {sorted(g.name for g in grids)}")
        # lm_head is listed so that naming any skip module does not make transformers quantize the head
        return bnb_config(next(iter(grids)), sorted({"lm_head", *ctx.ignored}))


# ---------------------------------------------------------------------------------------------------------------
# Reading

_HIDDEN = ("weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map")


class BnbSource(TensorSource):
    """A bitsandbytes 4-bit checkpoint presented as dense weights: ``P.weight`` is dequantized on read as the
    loader's matmul computes it: table[code]·absmax in float32, rounded to bnb_4bit_compute_dtype (float32 when
    the config names none, BitsAndBytesConfig's default)."""

    def __init__(self, raw: SafetensorsDirSource):
        self.raw = raw
        self.name = raw.name
        self.config = raw.config
        self.adapter = raw.adapter
        self.input_files = raw.input_files
        qc = raw.config["quantization_config"]
        if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
            raise InputError(f"{raw.name}: bitsandbytes 8-bit (LLM.int8) checkpoints are not readable; 4-bit only")
        compute = qc.get("bnb_4bit_compute_dtype") or "float32"
        if compute not in DTYPES:
            raise InputError(f"{raw.name}: bnb_4bit_compute_dtype {compute!r} is not one of {', '.join(DTYPES)}")
        self.compute_dtype = DTYPES[compute]
        self._states: dict[str, tuple[str, dict]] = {}  # module → (state tensor name, quant state)
        for n in raw.names():
            head, sep, qtype = n.partition("." + STATE_PREFIX)
            if not sep:
                continue
            try:
                state = json.loads(bytes(raw.read(n).numpy()).decode("utf-8"))
                shape = tuple(int(x) for x in state["shape"])
                if len(shape) != 2 or state["quant_type"] != qtype or int(state["blocksize"]) not in BLOCKSIZES:
                    raise ValueError
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise InputError(f"{raw.name}: {n}: not a valid bitsandbytes 4-bit quant state") from None
            self._states[head] = (n, state)
        hidden = {f"{m}.{s}" for m in self._states for s in _HIDDEN} | {n for n, _ in self._states.values()}
        self._names = [n for n in raw.names() if n not in hidden]
        self._name_set = set(self._names)

    def names(self) -> list[str]:
        return self._names

    def has(self, name: str) -> bool:
        return name in self._name_set

    def shape(self, name: str) -> tuple[int, ...]:
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and mod in self._states:
            return tuple(int(x) for x in self._states[mod][1]["shape"])
        return self.raw.shape(name)

    def weights_dtype(self) -> torch.dtype:
        return self.compute_dtype

    def dequantized(self, module: str) -> torch.Tensor:
        from qconv.kernels.bnb4 import dequant_reference

        _, state = self._states[module]
        tensors = {s: self.raw.read(f"{module}.{s}") for s in ("weight", *_HIDDEN) if self.raw.has(f"{module}.{s}")}
        try:
            args = kernel_args(tensors, state)
            n = args["shape"][0] * args["shape"][1]
            nb = -(-n // args["blocksize"])
            if tensors["weight"].numel() * 2 < n or tensors["weight.absmax"].numel() != nb:
                raise ValueError("tensor sizes do not match the quant state's shape and blocksize")
        except (KeyError, ValueError) as e:
            raise InputError(f"{self.name}: {module}: malformed bitsandbytes tensors ({e})") from None
        return dequant_reference(**args).to(self.compute_dtype)

    def _read(self, name: str) -> torch.Tensor:
        mod = name.removesuffix(".weight")
        if name.endswith(".weight") and mod in self._states:
            return self.dequantized(mod)
        return self.raw.read(name)

    def tokenizer_dir(self) -> Path:
        return self.raw.tokenizer_dir()

"""llama.cpp's mixed-precision rules: which GGML type each tensor of a GGUF gets for a given file type (Q4_K_M …).

Mirrors src/llama-quant.cpp (llama_tensor_get_type) for the llama family so that qconv's files have the same
per-tensor types, hence the same size, as llama-quantize's: the default type of the file type, the "more bits"
layers for attn_v and ffn_down, attn_output, GQA / expert-count / 70B adjustments, tensors never quantized, the
fallbacks when a row length does not divide the block size, and the --tensor-type / --output-tensor-type /
--token-embedding-type / --pure options. tests/test_gguf_mix.py checks the result against llama.cpp itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qconv.errors import InputError
from qconv.formats.ggml_blocks import BLOCK_SIZE, GGMLType

T = GGMLType

# llama-quantize's file types: name → (general.file_type, default tensor type). Q3_K/Q4_K/Q5_K are its aliases
# for the _M mixes.
FILE_TYPES: dict[str, tuple[int, GGMLType]] = {
    "F32": (0, T.F32),
    "F16": (1, T.F16),
    "BF16": (32, T.BF16),
    "Q4_0": (2, T.Q4_0),
    "Q4_1": (3, T.Q4_1),
    "Q8_0": (7, T.Q8_0),
    "Q5_0": (8, T.Q5_0),
    "Q5_1": (9, T.Q5_1),
    "Q2_K": (10, T.Q2_K),
    "Q3_K_S": (11, T.Q3_K),
    "Q3_K_M": (12, T.Q3_K),
    "Q3_K_L": (13, T.Q3_K),
    "Q4_K_S": (14, T.Q4_K),
    "Q4_K_M": (15, T.Q4_K),
    "Q5_K_S": (16, T.Q5_K),
    "Q5_K_M": (17, T.Q5_K),
    "Q6_K": (18, T.Q6_K),
    "IQ4_NL": (25, T.IQ4_NL),
    "IQ4_XS": (30, T.IQ4_XS),
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# types a tensor may be given explicitly (--tensor-type, --output-tensor-type, --token-embedding-type)
TENSOR_TYPES = {t.name: t for t in (*FLOAT_TYPES, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K,
                                    T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4)}  # fmt: skip

# When a row does not divide the block size: K and IQ types fall back to a 32-block type, then F16.
_FALLBACK = {T.IQ4_XS: T.IQ4_NL, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
# Tensors llama.cpp never quantizes (besides 1-D ones and norms), by name fragment.
_NEVER = ("ffn_gate_inp.weight", "position_embd", "token_types.weight", "ssm_conv1d", "attn_rel_b.weight")


def file_type(name: str) -> tuple[str, int, GGMLType]:
    """Normalise a --gguf-type name → (canonical name, general.file_type, default type); InputError if unknown."""
    key = ALIASES.get(name.upper(), name.upper())
    if key not in FILE_TYPES:
        raise InputError(f"--gguf-type {name}: unknown; choose one of {', '.join(FILE_TYPES)} (Q4_K = Q4_K_M)")
    return key, *FILE_TYPES[key]


def named_type(name: str, where: str) -> GGMLType:
    t = TENSOR_TYPES.get(name.upper().replace("Q4_K_M", "Q4_K"))
    if t is None:
        raise InputError(f"{where} {name}: unknown GGML type; choose one of {', '.join(TENSOR_TYPES)}")
    return t


@dataclass(frozen=True)
class ModelShape:
    """What the rules need to know of the model (from its GGUF metadata)."""

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B for these archs: 80 layers (llama: with GQA and not 8 experts)
        if self.arch == "llama":
            return self.n_layer == 80 and self.n_head != self.n_head_kv and self.n_expert != 8
        return self.arch == "qwen2" and self.n_layer == 80


@dataclass(frozen=True)
class MixOptions:
    pure: bool = False
    output_type: GGMLType | None = None
    token_embedding_type: GGMLType | None = None
    overrides: tuple[tuple[str, GGMLType], ...] = ()
    has_imatrix: bool = False
    leave_output: bool = False


@dataclass
class MixPlan:
    """Type per GGUF tensor name, in llama.cpp's processing (and file) order, with notes on fallbacks."""

    order: list[str]
    types: dict[str, GGMLType]
    notes: dict[str, str] = field(default_factory=dict)


def layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_order(names: Sequence[str]) -> list[str]:
    """llama.cpp's loader order: tensors outside blocks first, then by layer number, then by name."""
    return sorted(names, key=lambda n: (layer_of(n), n))


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "v"),
        ("attn_kv_b.weight", "v"),
        ("attn_v.weight", "v"),
        ("attn_k.weight", "k"),
        ("attn_q.weight", "q"),
        ("attn_output.weight", "o"),
        ("ffn_up", "up"),
        ("ffn_gate", "gate"),
        ("ffn_down", "down"),
    ):
        if key in name:
            return cat
    return "other"


def _dims(shape: Sequence[int]) -> int:
    """ggml's n_dims: leading size-1 dims of a torch shape (trailing in ggml's ne) do not count."""
    n = len(shape)
    k = 0
    while k < n - 1 and shape[k] == 1:
        k += 1
    return n - k


def quantizable(name: str, shape: Sequence[int], leave_output: bool = False) -> bool:
    if _dims(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    if leave_output and name == "output.weight":
        return False
    return not any(frag in name for frag in _NEVER)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(row: int, t: GGMLType) -> GGMLType:
    """The type llama.cpp uses instead of ``t`` when rows of ``row`` elements do not divide its block."""
    if row % BLOCK_SIZE[t] == 0:
        return t
    fb = _FALLBACK.get(t, t)
    return fb if row % BLOCK_SIZE[fb] == 0 else T.F16


class _Counters:
    def __init__(self):
        self.wv = self.down = 0


def _mixed_type(ft: str, default: GGMLType, name: str, row: int, m: ModelShape, opts: MixOptions, tied: bool,
                n_wv: int, c: _Counters) -> GGMLType:  # fmt: skip
    cat = category(name)
    new = default
    if cat == "output" or (tied and cat == "token_embd"):
        if opts.output_type is not None:
            return opts.output_type
        if row % BLOCK_SIZE[new]:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if cat == "token_embd":
        return opts.token_embedding_type or new
    if cat == "v":
        iv = c.wv
        if ft == "Q2_K":
            new = T.Q4_K if m.n_gqa >= 4 else T.Q3_K
        elif ft == "Q3_K_M":
            new = T.Q5_K if iv < 2 else T.Q4_K
        elif ft == "Q3_K_L":
            new = T.Q5_K
        elif ft in ("IQ4_NL", "IQ4_XS") and m.n_gqa >= 4:
            new = T.Q5_K
        elif ft in ("Q4_K_M", "Q5_K_M") and _more_bits(iv, n_wv):
            new = T.Q6_K
        elif ft == "Q4_K_S" and iv < 4:
            new = T.Q5_K
        if m.is_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if m.n_expert == 8:
            new = T.Q8_0
        c.wv += 1
        return new
    if cat == "k":
        return T.Q8_0 if m.n_expert == 8 else new
    if cat == "down":
        i = layer_of(name) if m.n_expert > 1 else c.down
        n = m.n_layer
        if ft == "Q2_K":
            new = T.Q3_K
        elif ft == "Q3_K_M":
            new = T.Q5_K if i < n // 16 else T.Q4_K
        elif ft == "Q3_K_L":
            new = T.Q5_K
        elif ft == "Q4_K_M":
            new = T.Q6_K if _more_bits(i, n) else new
        elif i < n // 8 and ft in ("IQ4_NL", "IQ4_XS") and not opts.has_imatrix:
            new = T.Q5_K
        elif ft == "Q5_K_M" and _more_bits(i, n):
            new = T.Q6_K
        elif ft == "Q4_K_S" and i < n // 8:
            new = T.Q5_K
        elif ft in ("Q4_0", "Q5_0") and opts.has_imatrix and i < n // 8:
            new = T.Q4_1 if ft == "Q4_0" else T.Q5_1
        c.down += 1
        return new
    if cat == "o":
        if m.n_expert == 8:
            if ft in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                new = T.Q5_K
        elif ft == "Q2_K":
            new = T.Q3_K
        elif ft == "Q3_K_M":
            new = T.Q4_K
        elif ft == "Q3_K_L":
            new = T.Q5_K
        return new
    return new


def plan_types(
    tensors: Mapping[str, Sequence[int]], ftype: str, model: ModelShape, opts: MixOptions = MixOptions()
) -> MixPlan:
    """Types for ``tensors`` (GGUF name → torch-order shape; the row length is the last dim) under ``ftype``.

    Tensors that are not quantized get F32 (1-D tensors and norms, as llama.cpp's converter stores them) or, for
    float file types, that type.
    """
    ft, _, default = file_type(ftype)
    order = llama_order(list(tensors))
    tied = "output.weight" not in tensors
    n_wv = sum(1 for n in order if category(n) == "v")
    counters = _Counters()
    types: dict[str, GGMLType] = {}
    notes: dict[str, str] = {}
    for name in order:
        shape = tensors[name]
        row = shape[-1]
        if not quantizable(name, shape, opts.leave_output):
            # as llama.cpp's converter stores them: 1-D, norms and routers in F32, anything else in F16
            small = _dims(shape) < 2 or "_norm" in name or any(f in name for f in _NEVER)
            types[name] = T.F32 if small or ft == "F32" else T.F16
            continue
        cat = category(name)
        if opts.token_embedding_type is not None and cat == "token_embd":
            want = opts.token_embedding_type
        elif opts.output_type is not None and cat == "output":
            want = opts.output_type
        elif default in FLOAT_TYPES:
            types[name] = default
            continue
        else:
            want = default
            manual = False
            for pattern, t in opts.overrides:
                if re.search(pattern, name):
                    want, manual = t, True
                    break
            if not manual and not opts.pure:
                want = _mixed_type(ft, default, name, row, model, opts, tied, n_wv, counters)
        got = fallback(row, want)
        if got != want:
            # llama-quantize aborts on an explicit output/embedding type that does not fit; qconv falls back
            notes[name] = f"{want.name} → {got.name}: rows of {row} do not divide its block of {BLOCK_SIZE[want]}"
        types[name] = got
    return MixPlan(order, types, notes)

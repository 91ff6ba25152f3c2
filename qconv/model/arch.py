"""Declarative adapters for the supported decoder-only families.

An adapter says where the decoder layers are, which linears each layer holds (in the order they execute, grouped
by shared input), which op feeds each group (AWQ folds scales into it), and how names map to llama.cpp's.
Adding a family means adding data here, not code elsewhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qconv.errors import InputError


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input, e.g. q/k/v. ``feeds_from`` is the op producing that input: a norm
    (its weight can absorb a per-channel scale) or a linear (its output rows can)."""

    linears: tuple[str, ...]
    feeds_from: str


@dataclass(frozen=True)
class ExpertSpec:
    """Mixture-of-experts feed-forward: ``block`` (relative to the layer) holds a dense router ``block.gate`` and
    ``block.experts.<e>.{gate,up,down}`` linears on disk (transformers fuses them into 3D tensors at load; qconv
    runs them as separate linears so every expert is quantized and measured on its own tokens)."""

    block: str
    count_keys: tuple[str, ...]  # config keys that may hold the expert count (releases renamed them)
    gate: str
    up: str
    down: str
    module: str = ""  # transformers' attribute for the block when it differs from the checkpoint's name

    def expert_groups(self, n: int) -> tuple[LinearGroup, ...]:
        groups: list[LinearGroup] = []
        for e in range(n):
            p = f"{self.block}.experts.{e}."
            # gate/up share their input with the router: a scale folded into the norm would change routing
            groups.append(LinearGroup((p + self.gate, p + self.up), ""))
        for e in range(n):
            p = f"{self.block}.experts.{e}."
            groups.append(LinearGroup((p + self.down,), p + self.up))
        return tuple(groups)


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    model_types: tuple[str, ...]
    groups: tuple[LinearGroup, ...]
    layers_prefix: str = "model.layers"
    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    # Per-layer tensors that are not linears (norms, q/k norms), relative to the layer prefix.
    layer_norms: tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")
    rope_permuted_in_gguf: bool = True
    experts: ExpertSpec | None = None
    num_experts: int = 0  # set when bound to a config

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantizable linear of a layer, in execution (true-sequential) order."""
        return tuple(name for g in self.groups for name in g.linears)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_prefix}.{i}."


_ATTN_MLP = (
    LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    LinearGroup(("self_attn.o_proj",), "self_attn.v_proj"),
    LinearGroup(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    LinearGroup(("mlp.down_proj",), "mlp.up_proj"),
)

# The attention's value path (every adapter's attention has these names): v's output reaches the residual stream
# only through attention's averaging and o. Quantizers may treat it differently (qconv.quant.ggml_grid.fit).
VALUE_PATH: frozenset[str] = frozenset({"self_attn.v_proj", "self_attn.o_proj"})

ADAPTERS: tuple[ArchAdapter, ...] = (
    ArchAdapter("llama", ("llama",), _ATTN_MLP),
    ArchAdapter("mistral", ("mistral",), _ATTN_MLP),
    ArchAdapter("qwen2", ("qwen2",), _ATTN_MLP),
    ArchAdapter(
        "qwen3",
        ("qwen3",),
        _ATTN_MLP,
        layer_norms=(
            "input_layernorm.weight",
            "post_attention_layernorm.weight",
            "self_attn.q_norm.weight",
            "self_attn.k_norm.weight",
        ),
    ),
)

_ATTN = _ATTN_MLP[:2]
_QK_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
)
ADAPTERS += (
    ArchAdapter(
        "mixtral",
        ("mixtral",),
        _ATTN,
        experts=ExpertSpec("block_sparse_moe", ("num_local_experts",), "w1", "w3", "w2", module="mlp"),
    ),
    ArchAdapter(
        "qwen3_moe",
        ("qwen3_moe",),
        _ATTN,
        layer_norms=_QK_NORMS,
        experts=ExpertSpec("mlp", ("num_experts", "num_local_experts"), "gate_proj", "up_proj", "down_proj"),
    ),
)

SUPPORTED = tuple(t for a in ADAPTERS for t in a.model_types)


def _bind_experts(a: ArchAdapter, config: dict, where: str) -> ArchAdapter:
    """An MoE adapter with its expert linears spelled out for this config's expert count."""
    spec = a.experts
    assert spec is not None
    n = next((config[k] for k in spec.count_keys if k in config), None)
    if not isinstance(n, int) or n < 1:
        raise InputError(f"{where}: {spec.count_keys[0]} must be a positive integer for a {a.family} model")
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise InputError(f"{where}: {a.family} models mixing dense and expert layers are not supported yet")
    return dataclasses.replace(a, groups=a.groups + spec.expert_groups(n), num_experts=n)


def adapter_for(config: dict, where: str) -> ArchAdapter:
    """The adapter for an HF config dict; InputError naming ``where`` and the supported list otherwise."""
    model_type = config.get("model_type")
    for a in ADAPTERS:
        if model_type in a.model_types:
            return _bind_experts(a, config, where) if a.experts else a
    archs = config.get("architectures") or []
    shown = model_type or (archs[0] if archs else "unknown")
    raise InputError(f"{where}: unsupported architecture {shown!r}; supported: {', '.join(SUPPORTED)}")


# llama.cpp tensor names for the llama family (shared by mistral/qwen2/qwen3 in llama.cpp's converters).
GGUF_LAYER_NAMES: dict[str, str] = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
GGUF_GLOBAL_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

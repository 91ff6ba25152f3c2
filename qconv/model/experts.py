"""Mixture-of-experts feed-forwards run as separate linears.

transformers (5.x) fuses a layer's experts into 3D parameters (``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]); checkpoints keep one linear per expert and projection. qconv swaps the fused module for this one,
which holds those linears under their checkpoint names, so statistics hooks, true-sequential quantization and
write-back address each expert like any other linear — and computes what the fused module computes.
"""

from __future__ import annotations

import torch
from torch import nn

from qconv.model.arch import ExpertSpec


class _Expert(nn.Module):
    def __init__(self, spec: ExpertSpec, hidden: int, inter: int):
        super().__init__()
        # names as on disk (e.g. w1/w3/w2 for Mixtral); bias-free like the fused parameters
        self.add_module(spec.gate, nn.Linear(hidden, inter, bias=False))
        self.add_module(spec.up, nn.Linear(hidden, inter, bias=False))
        self.add_module(spec.down, nn.Linear(inter, hidden, bias=False))


class ExpertLinears(nn.ModuleList):
    """Drop-in for transformers' fused experts: ``forward(hidden [N, H], top_k_index [N, k], top_k_weights [N, k])``
    → [N, H], each token's output the routing-weighted sum of its experts' act(gate(x))·up(x) → down."""

    def __init__(self, spec: ExpertSpec, fused: nn.Module):
        n, hidden, inter = fused.num_experts, fused.hidden_dim, fused.intermediate_dim
        super().__init__([_Expert(spec, hidden, inter) for _ in range(n)])
        self.spec = spec
        object.__setattr__(self, "act_fn", fused.act_fn)  # not a child: the list holds experts only

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        s = self.spec
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            # every expert runs, even on no tokens, so hooks see each one (an empty batch adds nothing)
            tok, pos = torch.where(top_k_index == e)
            x = hidden_states[tok]
            y = getattr(expert, s.down)(self.act_fn(getattr(expert, s.gate)(x)) * getattr(expert, s.up)(x))
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out


def unfuse_experts(layer: nn.Module, spec: ExpertSpec) -> None:
    """Replace ``layer.<block>.experts`` (fused, on any device) with ExpertLinears (on the meta device)."""
    if spec.module and spec.module != spec.block:
        # The checkpoint calls the block differently (Mixtral: block_sparse_moe vs mlp): register it under the
        # checkpoint's name, so tensor names match, and keep the attribute the layer's forward reads.
        block = layer._modules.pop(spec.module)
        layer._modules[spec.block] = block
        object.__setattr__(layer, spec.module, block)
    block = layer.get_submodule(spec.block)
    with torch.device("meta"):
        block.experts = ExpertLinears(spec, block.experts)

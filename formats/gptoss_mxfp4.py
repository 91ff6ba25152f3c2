"""The gpt-oss MXFP4 layout that transformers' Mxfp4 integration reads (``quant_method: "mxfp4"``).

transformers applies it only to gpt-oss MoE experts (GptOssMLP → Mxfp4GptOssExperts): per expert projection
``P`` in {gate_up_proj, down_proj} of layer i,
  model.layers.i.mlp.experts.P_blocks  uint8 [E, rows, in/32, 16]   two E2M1 codes a byte, low nibble first
  model.layers.i.mlp.experts.P_scales  uint8 [E, rows, in/32]       E8M0 exponents (2^(e − 127))
where [rows, in] is one expert's weight as a Linear would hold it; transformers dequantizes to [E, rows, in]
(convert_moe_packed_tensors) and transposes to its [E, in, rows] expert parameters. Dense linears (every
architecture qconv writes: llama, mistral, qwen2, qwen3) are never read from this layout, so qconv has no
``--format`` for it: these functions pack and unpack expert stacks, tested against transformers' own conversion.
"""

from __future__ import annotations

import torch

from qconv.kernels.mx import pack_nibbles, unpack_nibbles
from qconv.quant.mx import MX_BLOCK, FP4Grid, FP4Tensor


def to_gptoss(experts: list[FP4Tensor] | FP4Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 weights [rows, in] (one, or a list of experts) → (blocks [.., rows, in/32, 16], scales [.., rows, G])."""
    qts = [experts] if isinstance(experts, FP4Tensor) else list(experts)
    blocks, scales = [], []
    for qt in qts:
        if qt.grid.kind != "mxfp4":
            raise ValueError(f"gpt-oss stores MXFP4, not {qt.grid.kind}")
        rows, in_f = qt.shape
        blocks.append(pack_nibbles(qt.codes.reshape(rows, in_f // MX_BLOCK, MX_BLOCK)))
        scales.append(qt.scales.to(torch.uint8))
    if isinstance(experts, FP4Tensor):
        return blocks[0], scales[0]
    return torch.stack(blocks), torch.stack(scales)


def from_gptoss(blocks: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> list[FP4Tensor]:
    """(blocks [E, rows, G, 16], scales [E, rows, G]) → one FP4Tensor [rows, 32·G] per expert."""
    if blocks.dim() != 4 or blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MX_BLOCK // 2:
        raise ValueError(f"gpt-oss blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)} do not match")
    grid = FP4Grid("mxfp4", out_dtype)
    out = []
    for b, s in zip(blocks, scales):
        codes = unpack_nibbles(b).reshape(b.shape[0], -1)
        out.append(FP4Tensor(grid, codes, s.to(torch.uint8)))
    return out

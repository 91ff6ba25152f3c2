"""Quality report: perplexity the way llama.cpp's llama-perplexity computes it, plus KL divergence and top-1
agreement against the base model.

Perplexity: the text is tokenized whole (BOS first when the vocabulary adds one), cut into ``chunks`` of ``ctx``
tokens whose first token is replaced by BOS (when used); in each chunk only the second half is scored (positions
ctx/2 … ctx−2 predicting the next token), so every scored token has at least ctx/2 tokens of context.

Both models run one decoder layer at a time over all chunks (memory ≈ one layer + the chunks' hidden states).
The base model's final hidden states are cached on disk by a fingerprint of (model files, text, ctx, chunks), so
comparing several artifacts against one base runs the base once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qconv import __version__
from qconv.calibration import add_bos, packaged_texts, sha256_texts
from qconv.errors import InputError
from qconv.memory import trim
from qconv.model.runner import LayerRunner, compute_dtype, logits_fn
from qconv.model.source import TensorSource, cache_root, open_source
from qconv.progress import Reporter


@dataclass(frozen=True)
class EvalText:
    chunks: torch.Tensor  # int64 [n, ctx]
    source: str
    sha256: str
    n_tokens: int


def cache_dir() -> Path:
    return cache_root() / "eval"


def load_eval_text(path: str | None, tokenizer, ctx: int, chunks: int | None) -> EvalText:
    if ctx < 8:
        raise InputError(f"--ctx {ctx}: too small (at least 8 tokens)")
    if path is None:
        texts = [t for _, t in packaged_texts("eval")]
        source = "qconv-default-eval"
        text = "\n\n".join(t.strip("\n") for t in texts)
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"{path}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text") from None
        source = str(p)
    bos = tokenizer.bos_token_id if add_bos(tokenizer) else None
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if bos is not None:
        ids = [bos, *ids]
    ids = torch.tensor(ids, dtype=torch.int64)
    available = ids.numel() // ctx
    if available < 1:
        raise InputError(f"{source}: {ids.numel()} tokens, fewer than one chunk of --ctx {ctx}")
    n = available if chunks is None else chunks
    if n > available:
        raise InputError(f"--chunks {n}: {source} holds only {available} chunks of {ctx} tokens")
    rows = ids[: n * ctx].reshape(n, ctx).clone()
    if bos is not None:
        rows[:, 0] = bos
    return EvalText(rows, source, sha256_texts([text]), int(ids.numel()))


def final_hidden(
    source: TensorSource,
    chunks: torch.Tensor,
    device: torch.device,
    batch: int,
    reporter: Reporter,
    label: str,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, LayerRunner]:
    """Run every chunk through all decoder layers → hidden states before the final norm, float32 [n, ctx, H]."""
    runner = LayerRunner(source, device, dtype or compute_dtype(device))
    h = runner.embed(chunks).float().cpu()
    with reporter.task(f"eval: {label}", source.num_layers) as advance:
        for i in range(source.num_layers):
            layer = runner.load_layer(i)
            runner.run(layer, i, h, batch, into=h)
            del layer
            trim()
            advance(1, f"layer {i}")
    return h, runner


def _fingerprint(source: TensorSource, text: EvalText, device: torch.device, dtype: torch.dtype) -> str:
    h = hashlib.sha256()
    for f in source.input_files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(text.chunks.numpy().tobytes())
    h.update(f"{device.type}|{dtype}|{__version__}".encode())
    return h.hexdigest()[:32]


def base_hidden(
    source, text, device, batch, reporter, use_cache: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, LayerRunner | None]:
    """The base model's scored-half final hidden states, from the cache when possible."""
    from safetensors.torch import load_file, save_file

    first = text.chunks.shape[1] // 2
    path = cache_dir() / f"base-{_fingerprint(source, text, device, dtype)}.safetensors"
    if use_cache and path.is_file():
        try:
            return load_file(str(path))["hidden"], None
        except Exception:  # a corrupt cache entry is recomputed, never trusted
            path.unlink(missing_ok=True)
    h, runner = final_hidden(source, text.chunks, device, batch, reporter, "base model", dtype)
    h = h[:, first:].contiguous()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"hidden": h}, str(tmp))
        os.replace(tmp, path)
    return h, runner


@torch.no_grad()
def compare(
    base_h: torch.Tensor, quant_h: torch.Tensor, base_logits, quant_logits, chunks: torch.Tensor
) -> dict[str, float]:
    """Metrics over the scored positions. base_h/quant_h: float32 [n, ctx − ctx/2, H] (second halves)."""
    n, ctx = chunks.shape
    first = ctx // 2
    nll_q = nll_b = 0.0
    kl_all = []
    agree = 0
    count = 0
    for c in range(n):
        targets = chunks[c, first + 1 :]
        lb = F.log_softmax(base_logits(base_h[c : c + 1, :-1])[0], dim=-1)
        lq = F.log_softmax(quant_logits(quant_h[c : c + 1, :-1])[0], dim=-1)
        nll_b -= float(lb.gather(1, targets[:, None].to(lb.device)).sum())
        nll_q -= float(lq.gather(1, targets[:, None].to(lq.device)).sum())
        kl = (lb.exp() * (lb - lq)).sum(-1).clamp_min(0)
        kl_all.append(kl.cpu())
        agree += int((lb.argmax(-1) == lq.argmax(-1)).sum())
        count += targets.numel()
    kl = torch.cat(kl_all).double()
    return {
        "ppl": math.exp(nll_q / count),
        "base_ppl": math.exp(nll_b / count),
        "kld_mean": float(kl.mean()),
        "kld_median": float(kl.median()),
        "kld_p99": float(torch.quantile(kl, 0.99)) if kl.numel() < 16_000_000 else float("nan"),
        "top1_agreement": agree / count,
        "tokens_scored": count,
    }


def evaluate(
    artifact: str,
    base: str,
    text_path: str | None = None,
    chunks: int | None = None,
    ctx: int = 512,
    device: str = "cpu",
    batch: int = 4,
    reporter: Reporter | None = None,
    use_cache: bool = True,
    dtype: str = "auto",
) -> dict:
    """Perplexity of ``artifact`` and its KL divergence / top-1 agreement against ``base``, on the same tokens."""
    import transformers

    reporter = reporter or Reporter(quiet=True)
    dev = torch.device(device)
    dt = compute_dtype(dev, dtype)
    base_src = open_source(base)
    art_src = open_source(artifact)
    try:
        if art_src.config.get("vocab_size") != base_src.config.get("vocab_size"):
            raise InputError(f"{artifact}: vocabulary differs from the base model {base}")
        tok = transformers.AutoTokenizer.from_pretrained(str(base_src.tokenizer_dir()))
        text = load_eval_text(text_path, tok, ctx, chunks)
        bh, brunner = base_hidden(base_src, text, dev, batch, reporter, use_cache, dt)
        brunner = brunner or LayerRunner(base_src, dev, dt)
        qh, qrunner = final_hidden(art_src, text.chunks, dev, batch, reporter, "quantized model", dt)
        qh = qh[:, ctx // 2 :]
        with reporter.task("eval: scoring", None):
            m = compare(bh, qh, logits_fn(brunner), logits_fn(qrunner), text.chunks)
    finally:
        base_src.close()
        art_src.close()
    m = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}
    m["ppl_ratio"] = round(m["ppl"] / m["base_ppl"], 6)
    return {
        **m,
        "chunks": int(text.chunks.shape[0]),
        "ctx": ctx,
        "text": {"source": text.source, "sha256": text.sha256, "tokens": text.n_tokens},
        "base": base,
    }


def format_report(r: dict) -> str:
    return "\n".join(
        [
            f"  perplexity      {r['ppl']:.4f}   (base {r['base_ppl']:.4f}, ratio {r['ppl_ratio']:.4f})",
            f"  KL divergence   mean {r['kld_mean']:.6f}   median {r['kld_median']:.6f}   p99 {r['kld_p99']:.6f}",
            f"  top-1 agreement {r['top1_agreement'] * 100:.2f} %",
            f"  text            {r['text']['source']}: {r['chunks']} chunks × {r['ctx']} tokens "
            f"({r['tokens_scored']} scored)",
        ]
    )


def dumps(r: dict) -> str:
    return json.dumps(r, indent=2)

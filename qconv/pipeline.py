"""`qconv quantize` end to end, in one pass over the decoder layers.

open the checkpoint lazily → plan every output tensor (fail fast on layout problems) → for each decoder layer:
load it, let the method collect statistics from calibration activations (which come out of the already
quantized previous layers) and choose codes → the format packs, verifies with a kernel and writes → run the
quantized layer to make the next layer's inputs → free it. Peak memory is one layer plus the activations.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qconv import __version__
from qconv.calibration import CalibrationSet, build_calibration
from qconv.errors import InputError
from qconv.formats.base import GridRequest, WriteContext
from qconv.formats.hf_folder import AtomicOutput, dtype_name
from qconv.formats.registry import WRITERS
from qconv.kernels.verify import Verifier
from qconv.manifest import BackgroundDigests, build_manifest, write_manifest, write_model_card
from qconv.memory import available_memory, trim
from qconv.methods import METHODS, LayerContext, MethodOptions
from qconv.methods.rtn import rtn
from qconv.model.runner import LayerRunner, compute_mode, load_weights
from qconv.model.source import TensorSource, open_source
from qconv.options import resolve as resolve_options
from qconv.progress import Reporter
from qconv.replay import ReplayCache
from qconv.resume import NoCheckpoints, ResumeStore, fingerprint
from qconv.stats import StatsCollector

DEFAULT_IGNORE = ()  # embeddings, lm_head and norms are never candidates; --ignore adds linears


@dataclass
class QuantizeConfig:
    """Everything that determines the artifact's bytes (recorded in the manifest)."""

    method: str = "rtn"
    format: str = "safetensors"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    clip: str = "minmax"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    calib: str | None = None
    calib_field: str | None = None
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 0
    dtype: str = "auto"
    compute_dtype: str = "auto"  # the layers' dtype during calibration passes (changes the statistics)
    method_options: dict = field(default_factory=dict)
    format_options: dict = field(default_factory=dict)
    opts: dict = field(default_factory=dict)  # --opt KEY=VALUE pairs, resolved against the method's and format's

    def manifest(self) -> dict:
        d = asdict(self)
        d["ignore"] = list(self.ignore)
        return d


@dataclass
class RunOptions:
    """How to run (does not change the artifact's bytes)."""

    device: str = "cpu"
    batch_size: int = 8
    verify: str = "auto"
    max_shard_bytes: int = 5 * 1024**3
    force: bool = False
    allow_pickle: bool = False
    revision: str | None = None
    resume: bool = False  # continue an interrupted run after its last finished layer (qconv.resume)
    offload_activations: str | None = None  # folder for the calibration activations (disk instead of memory)
    checkpoint: bool = True  # keep per-layer checkpoints for --resume (they take about the output's size on disk)
    replay: bool = True  # reuse finished sub-blocks' inputs across a layer's calibration passes (qconv.replay)


def resolve_dtype(name: str, source: TensorSource) -> torch.dtype:
    if name == "auto":
        dt = source.torch_dtype()
        return dt if dt in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    try:
        dt = getattr(torch, name)
    except AttributeError:
        dt = None
    if dt not in (torch.float16, torch.bfloat16, torch.float32):
        raise InputError(f"--dtype {name}: choose float16, bfloat16, float32 or auto")
    return dt


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: choose cpu or cuda")
    return dev


def calibration_for(source: TensorSource, cfg: QuantizeConfig, reporter: Reporter) -> tuple[CalibrationSet, object]:
    import transformers

    with reporter.task("tokenizing calibration text", None):
        tok = transformers.AutoTokenizer.from_pretrained(str(source.tokenizer_dir()))
        calib = build_calibration(cfg.calib, tok, cfg.calib_samples, cfg.calib_seqlen, cfg.seed, cfg.calib_field)
    return calib, tok


def quantize(
    model: str,
    out: Path,
    cfg: QuantizeConfig,
    run: RunOptions,
    reporter: Reporter | None = None,
    argv: list[str] | None = None,
    eval_fn=None,
    digests: BackgroundDigests | None = None,
) -> dict:
    """Quantize ``model`` into ``out``; returns the run summary. ``eval_fn(path) -> dict`` (optional) evaluates
    the finished artifact before it is published, and its figures go into the manifest. ``digests``: the input
    digests, already started (used if they cover the source's input files, else cancelled)."""
    reporter = reporter or Reporter(quiet=True)
    t0 = time.perf_counter()
    if cfg.method not in METHODS:
        raise InputError(f"--method {cfg.method}: unknown; available: {', '.join(METHODS)}")
    if cfg.format not in WRITERS:
        raise InputError(f"--format {cfg.format}: unknown; available: {', '.join(WRITERS)}")
    if cfg.group_size != -1 and cfg.group_size < 1:
        raise InputError(f"--group-size {cfg.group_size}: use a positive size or -1 for per-channel")
    try:
        device = check_device(run.device)
        source = open_source(model, allow_pickle=run.allow_pickle, revision=run.revision)
    except BaseException:
        if digests is not None:
            digests.cancel()
        raise
    if digests is None or not digests.covers(source.input_files):
        if digests is not None:
            digests.cancel()
        # The manifest's input sha256s read every input byte again (16 GB for an 8B model): a thread hashes them
        # while the layers compute (hashlib and file reads release the GIL).
        digests = BackgroundDigests(source.input_files)
    try:
        return _quantize(source, out, cfg, run, reporter, argv, eval_fn, device, t0, digests)
    except BaseException:
        digests.cancel()  # e.g. the output exists: nothing needs the digests any more
        raise
    finally:
        source.close()


def _quantize(source, out, cfg, run, reporter, argv, eval_fn, device, t0, digests: BackgroundDigests) -> dict:
    dtype = resolve_dtype(cfg.dtype, source)
    try:
        patterns = [re.compile(p) for p in cfg.ignore]
    except re.error as e:
        raise InputError(f"--ignore {e.pattern!r}: not a valid regular expression ({e})") from None
    writer_cls = WRITERS[cfg.format]
    method_cls = METHODS[cfg.method]
    opts, method_opts, format_opts, made_static = effective_options(cfg)
    verifier = Verifier(run.verify)
    output = AtomicOutput(out, run.force, is_dir=not writer_cls.is_file, inputs=source.input_files)
    writer = writer_cls(output.path, verifier, run.max_shard_bytes, out.name, **cfg.format_options, **format_opts)
    store = None
    try:
        cfg.method_options = opts
        if made_static:
            reporter.log(f"--act-order: {cfg.format} stores no g_idx, so groups are static (actorder 'weight')")
        g_idx = bool(opts.get("act_order")) and not opts.get("static_groups")
        req = GridRequest(
            cfg.bits, cfg.group_size, cfg.symmetric, act_order=g_idx, scheme=method_cls.scheme, options=method_opts
        )
        plan = writer.plan(source, req, patterns, dtype)
        importance = load_importance(cfg.method_options.get("importance", "none"), source, plan)
        a = source.adapter
        method = method_cls(MethodOptions(clip=cfg.clip, extra={**cfg.method_options, "importance": importance}))
        grids = sorted({g.name for g in plan.grids.values()})
        reporter.log(
            f"[bold]qconv[/] {cfg.method} → {cfg.format}: {len(plan.grids)} tensors on {', '.join(grids) or 'none'}, "
            f"{source.num_layers} layers"
        )
        for note, count in Counter(plan.notes.values()).most_common():
            reporter.log(f"  {count} tensor{'s' if count > 1 else ''}: {note}")
        # Without calibration nothing runs through the layers: their bare tensors suffice (no transformers import,
        # no layer classes), except for fused MoE experts, which the real layer unfuses.
        runner = None
        if method.needs_calibration or a.experts is not None:
            runner = LayerRunner(source, device, *compute_mode(device, cfg.compute_dtype))
        calib = None
        hidden = None
        if method.needs_calibration:
            calib, _tok = calibration_for(source, cfg, reporter)
            hidden = embed_all(runner, calib.tokens, device, run.offload_activations, run.batch_size)
        provenance = {"qconv": __version__, "method": cfg.method, "calibration": calib.describe() if calib else None,
                      "importance": importance if isinstance(importance, str) else "imatrix file",
                      "act_order": bool(cfg.method_options.get("act_order")),
                      "static_groups": bool(cfg.method_options.get("static_groups")),
                      "damp": cfg.method_options.get("damp")}  # fmt: skip
        ctx = WriteContext(source.config, dtype, plan.grids, plan.ignored, source.tied, provenance, source)
        store = (
            ResumeStore(
                out,
                fingerprint(
                    [*source.input_files, *imatrix_files(cfg)],
                    cfg.manifest(),
                    __version__,
                    calib.describe() if calib else None,
                ),
                in_place=writer_cls.resumes_in_place,
            )
            if run.checkpoint
            else NoCheckpoints()
        )
        first = store.start(run.resume, output.path)
        if first:
            reporter.log(f"resuming after layer {first - 1} from {store.dir}")
            if hidden is not None and first < source.num_layers:
                store.load_hidden_into(first - 1, hidden)
        writer.resuming = bool(first) and store.in_place
        writer.begin(plan, ctx)
        tensor_stats: dict[str, dict] = {}
        dense = set(plan.dense)
        weight_dtype = source.weights_dtype()

        def put(kind: str, name: str, value, stats: dict | None, log: list | None = None) -> None:
            """Hand one tensor to the writer (recording the call in ``log`` for the resume checkpoint)."""
            if kind == "quantized":
                writer.write_quantized(name, value)
                tensor_stats[name] = stats
            else:
                writer.write_dense(name, value)
            if log is not None:  # in place, the checkpoint needs no values (and holding them would cost memory)
                log.append((kind, name, None if store.in_place else value, stats))

        def write_other(name: str, value: torch.Tensor | None = None, log: list | None = None) -> None:
            """A tensor the method does not quantize: dense, or plain RTN onto the grid the format gave it.
            ``value``: the method's changed version of it (AWQ-scaled norms), else the checkpoint's."""
            w = source.read(name) if value is None else value.detach().cpu()
            if name in plan.grids:
                imp = importance.get(name.removesuffix(".weight")) if isinstance(importance, dict) else None
                qt = rtn(w, plan.grids[name], importance=imp)
                put("quantized", name, qt, stats_row(qt), log)
            elif name in dense:
                put("dense", name, w.to(dtype), None, log)

        write_other(a.embed)
        with reporter.task("quantizing layers", source.num_layers) as advance:
            for i in range(first):  # finished before an interruption: replay the recorded writes
                for kind, name, value, stats in store.load_layer(i):
                    if value is not None:
                        put(kind, name, value, stats)
                        continue
                    writer.adopt(name)  # in place: already in the reopened partial output, verified when written
                    if kind == "quantized":
                        tensor_stats[name] = stats
                        verifier.checked += 1
                advance(1, f"layer {i} (resumed)")
            layer_seconds: list[float] = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for i in range(first, source.num_layers):
                t_layer = time.perf_counter()
                log: list | None = [] if run.checkpoint else None  # the layer's writes, for its checkpoint
                # Without calibration the layer only carries weights: keep them in their stored precision.
                if runner is None:
                    layer = load_weights(source, i, device, weight_dtype)
                else:
                    layer = runner.load_layer(i, dtype=None if hidden is not None else weight_dtype)
                prefix = a.layer_prefix(i)
                linears = [lin for lin in a.linears if f"{prefix}{lin}.weight" in plan.method]

                replay = replay_cache(runner, layer, i, hidden, linears, run, device)

                def collect(wanted, layer=layer, i=i, replay=replay):
                    # the replay hooks go first: a memo keeps a linear's input before the collector stops the pass
                    with replay.pass_(wanted), StatsCollector(layer, wanted, stop_early=True) as stats:
                        runner.run(layer, i, hidden, run.batch_size, keep=False)
                    return stats

                lctx = LayerContext(
                    index=i,
                    layer=layer,
                    linears=linears,
                    grids={lin: plan.grids[f"{prefix}{lin}.weight"] for lin in linears},
                    collect=collect if hidden is not None else None,
                    prefix=prefix,
                    groups=list(a.groups),
                )
                qts = method.quantize_layer(lctx)
                for lin in linears:
                    qt = qts.pop(lin)
                    if hidden is not None:  # the next calibration pass computes with the weights loaders will
                        lctx.set_weight(lin, qt.dequantize())
                    put("quantized", f"{prefix}{lin}.weight", qt, stats_row(qt), log)
                    del qt
                    trim()
                for name in source.layer_tensor_names(i):
                    if name not in plan.method:
                        override = lctx.overrides.get(name.removeprefix(prefix))
                        write_other(name, override, log)
                # The layer's tensors are in the output before its checkpoint says so, and before the next pass
                # through the layer: the writer's background pieces keep torch at one thread meanwhile.
                writer.flush()
                last = i + 1 == source.num_layers
                if hidden is not None and not last:
                    with replay.pass_():
                        runner.run(layer, i, hidden, run.batch_size, into=hidden)
                store.save_layer(i, log, None if last else hidden, output.path)
                del layer, lctx, qts, log, replay
                trim()
                layer_seconds.append(time.perf_counter() - t_layer)
                advance(1, f"layer {i}")
        write_other(a.final_norm)
        if not source.tied:
            write_other(a.lm_head)
        files = writer.finish(ctx)
        with reporter.task("hashing inputs", None):
            inputs = digests.result()
        manifest = build_manifest(
            source=source,
            inputs=inputs,
            cfg=cfg.manifest(),
            fmt_description=writer.description,
            calibration=calib.describe() if calib else None,
            verification={"mode": verifier.mode, "paths": sorted(verifier.paths), "tensors": verifier.checked},
            tensors=tensor_stats,
            plan=plan,
            out_dir=output.path,
            dtype=dtype_name(dtype),
            argv=argv,
        )
        manifest_path = writer.manifest_path()
        write_manifest(manifest_path, manifest)
        eval_result = None
        if eval_fn is not None:
            eval_result = eval_fn(writer.artifact_path())
            manifest["eval"] = eval_result
            write_manifest(manifest_path, manifest)
        if not writer.is_file:
            write_model_card(output.path, manifest)
        final = output.commit()
        store.discard()
        if writer.is_file:  # split outputs: report the first file, the one loaders are given
            final = final.with_name(files[0])
    except BaseException:
        digests.cancel()
        if store is not None:
            with contextlib.suppress(Exception):
                store.wait()  # a background checkpoint commit finishes (or fails) before the process unwinds
        writer.abort()
        kept = False
        if store is not None:
            with contextlib.suppress(Exception):
                kept = store.keep_partial(output.path)  # in place: what a --resume continues from
        if not kept:
            output.discard()
        raise
    seconds = time.perf_counter() - t0
    return {
        "ok": True,
        "output": str(final),
        "method": cfg.method,
        "format": cfg.format,
        "quantized_tensors": len(plan.grids),
        "quantized_linears": len(plan.method),
        "bits_per_weight": manifest["summary"]["bits_per_weight"],
        "artifact_bytes": manifest["summary"]["artifact_bytes"],
        "seconds": round(seconds, 2),
        "verify_seconds": round(verifier.seconds, 3),
        # per decoder layer computed in this run (wall, including calibration passes, packing and writing)
        "layer_seconds": round(sum(layer_seconds) / len(layer_seconds), 3) if layer_seconds else None,
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
        "eval": eval_result,
        "files": sorted(set(files)),
        "qconv_version": __version__,
    }


def effective_options(cfg: QuantizeConfig) -> tuple[dict, dict, dict, bool]:
    """What the run will use, without running it: (the method options after the method's --opt values are merged
    in and act-order is adjusted, the method's --opt values, the format's --opt values, whether act-order was made
    static). A format without g_idx (compressed-tensors dropped actorder "group") gets act-order with static groups:
    the columns are ordered during quantization only, group parameters fixed in natural order (actorder "weight").
    ``qconv batch`` compares finished artifacts against this."""
    method_cls, writer_cls = METHODS[cfg.method], WRITERS[cfg.format]
    method_opts, format_opts = resolve_options(
        cfg.opts, [(f"--method {cfg.method}", method_cls.options), (f"--format {cfg.format}", writer_cls.options)]
    )
    opts = {**cfg.method_options, **method_opts}
    made_static = (
        method_cls.scheme == "int"  # only integer groups have group parameters to fix (FP8 scales always are)
        and bool(opts.get("act_order"))
        and not opts.get("static_groups")
        and not writer_cls.supports_g_idx
    )
    if made_static:
        opts["static_groups"] = True
    return opts, method_opts, format_opts, made_static


def replay_cache(runner, layer, i: int, hidden, linears: list[str], run: RunOptions, device: torch.device):
    """The layer's sub-block memo (qconv.replay) when it pays and fits: calibration activations in memory on the
    CPU, where attention is the slow part of each true-sequential pass. Budget: four times the activations and a
    quarter of the memory available now, so a big model still runs in about one layer plus activations."""
    if hidden is None or not run.replay or device.type != "cpu" or run.offload_activations:
        return ReplayCache(layer, [], 0, 0, 0, lambda: None)
    budget = min(4 * hidden.numel() * hidden.element_size(), available_memory() // 4)
    n, t = hidden.shape[:2]
    return ReplayCache(
        layer,
        linears,
        n * t,
        runner.dtype.itemsize,
        budget,
        lambda: runner.run(layer, i, hidden[:1], 1, keep=False),
    )


def embed_all(runner: LayerRunner, tokens: torch.Tensor, device: torch.device, offload: str | None, batch: int):
    """Calibration activations [N, T, H] entering layer 0: on the compute device, or with ``offload`` in a file in
    that folder, memory-mapped (the OS pages it; only the micro-batch being run is resident). The file is unlinked
    once mapped, so it vanishes with the process however the run ends."""
    if offload is None:
        return runner.embed(tokens).to("cpu" if device.type == "cpu" else device)
    folder = Path(offload)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="qconv-activations-", suffix=".bin", dir=folder)
    except OSError as e:
        raise InputError(f"--offload-activations {offload}: cannot create a file there ({e.strerror})") from None
    os.close(fd)
    n, t = tokens.shape
    width = runner.embed_weight().shape[1]
    numel = n * t * width
    try:
        hidden = torch.from_file(name, shared=True, size=numel, dtype=runner.dtype).view(n, t, width)
    finally:
        os.unlink(name)
    for b in range(0, n, batch):
        hidden[b : b + batch] = runner.embed(tokens[b : b + batch]).to("cpu", runner.dtype)
    return hidden


def stats_row(qt) -> dict:
    return {"grid": qt.grid.name, **{k: round(v, 8) for k, v in qt.stats.items()}}


def imatrix_files(cfg: QuantizeConfig) -> list[Path]:
    """An --imatrix FILE is an input too (its contents shape the artifact)."""
    spec = cfg.method_options.get("importance")
    return [Path(spec)] if isinstance(spec, str) and spec not in ("none", "auto") and Path(spec).is_file() else []


def load_importance(spec, source, plan):
    """--imatrix: "none", "auto" (calibration mean x², collected by the method), or a llama.cpp imatrix file →
    {module name: float32 [in]} for the planned tensors."""
    if spec in ("none", "auto", None):
        return spec or "none"
    from qconv.imatrix import read_imatrix, to_hf_names

    return to_hf_names(read_imatrix(Path(spec)), source)

"""`qconv quantize` end to end, in one pass over the decoder layers.

open the checkpoint lazily → plan every output tensor (fail fast on layout problems) → for each decoder layer:
load it, let the method collect statistics from calibration activations (which come out of the already
quantized previous layers) and choose codes → the format packs, verifies with a kernel and writes → run the
quantized layer to make the next layer's inputs → free it. Peak memory is one layer plus the activations.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qconv import __version__
from qconv.calibration import CalibrationSet, build_calibration
from qconv.errors import InputError
from qconv.formats.base import GridRequest, WriteContext
from qconv.formats.hf_folder import AtomicOutput, copy_tokenizer, dtype_name
from qconv.formats.registry import WRITERS
from qconv.formats.safetensors_io import TensorSpec
from qconv.kernels.verify import Verifier
from qconv.manifest import build_manifest, file_digests, write_manifest, write_model_card
from qconv.memory import trim
from qconv.methods import METHODS, LayerContext, MethodOptions
from qconv.model.runner import LayerRunner
from qconv.model.source import TensorSource, open_source
from qconv.progress import Reporter
from qconv.quant.tensor import IntGrid
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
    method_options: dict = field(default_factory=dict)

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


def compute_dtype(device: torch.device) -> torch.dtype:
    # CPU kernels are fastest and exact in float32; on GPU bf16 halves activation memory for large models.
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: choose cpu or cuda")
    return dev


@dataclass
class Plan:
    """Which linears get which grid, which stay dense, and every output tensor in emission order."""

    grids: dict[str, IntGrid]  # module name → grid
    ignored: list[str]  # linear module names kept dense
    specs: list[TensorSpec]
    dense: list[str]  # full tensor names written unchanged (cast to the output dtype)


def make_plan(source: TensorSource, writer, cfg: QuantizeConfig, dtype: torch.dtype) -> Plan:
    try:
        patterns = [re.compile(p) for p in cfg.ignore]
    except re.error as e:
        raise InputError(f"--ignore {e.pattern!r}: not a valid regular expression ({e})") from None
    a = source.adapter
    req = GridRequest(cfg.bits, cfg.group_size, cfg.symmetric)
    grids: dict[str, IntGrid] = {}
    ignored: list[str] = []
    specs: list[TensorSpec] = []
    dense: list[str] = []

    def add_dense(name: str) -> None:
        specs.append(TensorSpec(name, source.shape(name), dtype))
        dense.append(name)

    add_dense(a.embed)
    for i in range(source.num_layers):
        prefix = a.layer_prefix(i)
        present = set(source.layer_tensor_names(i))
        expected = {f"{prefix}{lin}.weight" for lin in a.linears}
        missing = sorted(expected - present)
        if missing:
            raise InputError(f"{source.name}: missing tensor {missing[0]!r}")
        for lin in a.linears:
            module = prefix + lin
            shape = source.shape(module + ".weight")
            if any(p.search(module) for p in patterns):
                ignored.append(module)
                add_dense(module + ".weight")
                continue
            grid = writer.grid_for(module, shape, req, dtype)
            grids[module] = grid
            specs.extend(writer.quantized_specs(module, shape, grid))
        for name in sorted(present - expected):
            add_dense(name)
    add_dense(a.final_norm)
    if not source.tied:
        add_dense(a.lm_head)
    return Plan(grids, ignored, specs, dense)


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
) -> dict:
    """Quantize ``model`` into ``out``; returns the run summary. ``eval_fn(path) -> dict`` (optional) evaluates
    the finished artifact before it is published, and its figures go into the manifest."""
    reporter = reporter or Reporter(quiet=True)
    t0 = time.perf_counter()
    if cfg.method not in METHODS:
        raise InputError(f"--method {cfg.method}: unknown; available: {', '.join(METHODS)}")
    if cfg.format not in WRITERS:
        raise InputError(f"--format {cfg.format}: unknown; available: {', '.join(WRITERS)}")
    if cfg.group_size != -1 and cfg.group_size < 1:
        raise InputError(f"--group-size {cfg.group_size}: use a positive size or -1 for per-channel")
    device = check_device(run.device)
    source = open_source(model, allow_pickle=run.allow_pickle, revision=run.revision)
    try:
        return _quantize(source, out, cfg, run, reporter, argv, eval_fn, device, t0)
    finally:
        source.close()


def _quantize(source, out, cfg, run, reporter, argv, eval_fn, device, t0) -> dict:
    dtype = resolve_dtype(cfg.dtype, source)
    method = METHODS[cfg.method](MethodOptions(clip=cfg.clip, extra=cfg.method_options))
    verifier = Verifier(run.verify)
    output = AtomicOutput(out, run.force, is_dir=True, inputs=source.input_files)
    writer = WRITERS[cfg.format](output.path, verifier, run.max_shard_bytes)
    try:
        plan = make_plan(source, writer, cfg, dtype)
        reporter.log(
            f"[bold]qconv[/] {cfg.method} → {cfg.format}: {len(plan.grids)} linears on "
            f"{next(iter(plan.grids.values())).name if plan.grids else 'none'}, {source.num_layers} layers"
        )
        runner = LayerRunner(source, device, compute_dtype(device))
        calib = None
        hidden = None
        if method.needs_calibration:
            calib, _tok = calibration_for(source, cfg, reporter)
            hidden = runner.embed(calib.tokens).to("cpu" if device.type == "cpu" else device)
        ctx = WriteContext(source.config, dtype, plan.grids, plan.ignored, source.tied)
        writer.begin(plan.specs, ctx)
        tensor_stats: dict[str, dict] = {}
        dense = set(plan.dense)
        weight_dtype = source.weights_dtype()
        a = source.adapter
        writer.write_dense(a.embed, source.read(a.embed).to(dtype))
        with reporter.task("quantizing layers", source.num_layers) as advance:
            for i in range(source.num_layers):
                # Without calibration the layer only carries weights: keep them in their stored precision.
                layer = runner.load_layer(i, dtype=None if hidden is not None else weight_dtype)
                prefix = a.layer_prefix(i)
                linears = [lin for lin in a.linears if prefix + lin in plan.grids]

                def collect(wanted, layer=layer, i=i):
                    with StatsCollector(layer, wanted) as stats:
                        runner.run(layer, i, hidden, run.batch_size, keep=False)
                    return stats

                lctx = LayerContext(
                    index=i,
                    layer=layer,
                    linears=linears,
                    grids={lin: plan.grids[prefix + lin] for lin in linears},
                    collect=collect if hidden is not None else None,
                )
                qts = method.quantize_layer(lctx)
                for lin in linears:
                    qt = qts.pop(lin)
                    lctx.set_weight(lin, qt.dequantize())  # the weights loaders will compute
                    writer.write_quantized(prefix + lin, qt)
                    tensor_stats[prefix + lin] = {"grid": qt.grid.name, **{k: round(v, 8) for k, v in qt.stats.items()}}
                    del qt
                    trim()
                for name in source.layer_tensor_names(i):
                    if name in dense:
                        writer.write_dense(name, source.read(name).to(dtype))
                if hidden is not None and i + 1 < source.num_layers:
                    runner.run(layer, i, hidden, run.batch_size, into=hidden)
                del layer, lctx, qts
                trim()
                advance(1, f"layer {i}")
        writer.write_dense(a.final_norm, source.read(a.final_norm).to(dtype))
        if not source.tied:
            writer.write_dense(a.lm_head, source.read(a.lm_head).to(dtype))
        files = writer.finish(ctx)
        files += copy_tokenizer(source.tokenizer_dir(), output.path)
        with reporter.task("hashing inputs", None):
            inputs = file_digests(source.input_files)
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
        write_manifest(output.path, manifest)
        eval_result = None
        if eval_fn is not None:
            eval_result = eval_fn(output.path)
            manifest["eval"] = eval_result
            write_manifest(output.path, manifest)
        write_model_card(output.path, manifest)
        final = output.commit()
    except BaseException:
        writer.abort()
        output.discard()
        raise
    seconds = time.perf_counter() - t0
    return {
        "ok": True,
        "output": str(final),
        "method": cfg.method,
        "format": cfg.format,
        "quantized_linears": len(plan.grids),
        "bits_per_weight": manifest["summary"]["bits_per_weight"],
        "artifact_bytes": manifest["summary"]["artifact_bytes"],
        "seconds": round(seconds, 2),
        "verify_seconds": round(verifier.seconds, 3),
        "eval": eval_result,
        "files": sorted(set(files)),
        "qconv_version": __version__,
    }

"""qconv.json (the manifest) and the model card: what went in, how, what came out, how good it is.

The manifest holds no timestamps or timings, so the same inputs and config give byte-identical artifacts; run
times go to the ``--json`` summary instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import mmap
import os
import platform
import threading
from pathlib import Path

from qconv import __version__

MANIFEST = "qconv.json"


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024, cancel: threading.Event | None = None) -> str:
    """Hex sha256 of the file's bytes ("" once ``cancel`` is set). Hashed straight from read-only mappings of
    ``_HASH_WINDOW`` bytes where the file allows them: reading into a buffer first copies every byte once more (a 2 GB
    input: 1.44 s → 1.19 s of CPU, beside a conversion that wants both cores); one window at a time, so the mapped
    pages never add more than that to the process's resident size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        at = 0
        while at < size:
            n = min(_HASH_WINDOW, size - at)
            try:
                m = mmap.mmap(f.fileno(), n, access=mmap.ACCESS_READ, offset=at)
            except (ValueError, OSError):  # not mappable (some network filesystems): read the rest
                break
            with m:
                if hasattr(m, "madvise"):
                    m.madvise(mmap.MADV_SEQUENTIAL)
                view = memoryview(m)
                try:
                    for k in range(0, len(m), chunk):
                        if cancel is not None and cancel.is_set():
                            return ""
                        h.update(view[k : k + chunk])
                finally:
                    view.release()
            at += n
        f.seek(at)
        while b := f.read(chunk):
            if cancel is not None and cancel.is_set():
                return ""
            h.update(b)
    return h.hexdigest()


_HASH_WINDOW = 64 * 1024 * 1024  # a multiple of mmap.ALLOCATIONGRANULARITY (offsets must be)


def file_digests(paths: list[Path], cancel: threading.Event | None = None) -> list[dict]:
    return [
        {"name": Path(p).name, "bytes": Path(p).stat().st_size, "sha256": sha256_file(Path(p), cancel=cancel)}
        for p in paths
    ]


def likely_inputs(model: str) -> list[Path]:
    """The input files qconv.model.source will list for a local ``model`` (a GGUF file; a folder's config.json,
    safetensors files and index), found without importing torch, so that their digests can start while the heavy
    imports run on one core (hashing a 2 GB input is ~1 s of CPU). [] where unsure (a hub id, pickle weights)."""
    p = Path(model).expanduser()
    if p.is_file():
        return [p] if p.suffix == ".gguf" else []
    cfg, index = p / "config.json", p / "model.safetensors.index.json"
    if not cfg.is_file():
        return []
    if index.is_file():
        try:
            files = sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
        return [cfg, *files, index]
    files = sorted(p.glob("*.safetensors"))
    return [cfg, *files] if files else []


class BackgroundDigests:
    """``file_digests(paths)`` computed by a daemon thread from construction on; ``result()`` waits for it (and
    re-raises its error), ``cancel()`` stops it between chunks (an aborted run)."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._cancel = threading.Event()
        self._out: list[dict] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(list(paths),), daemon=True)
        self._thread.start()

    def _run(self, paths: list[Path]) -> None:
        with contextlib.suppress(AttributeError, OSError):
            # Lowest priority: on a small machine the hashing would otherwise take turns with the compute threads
            # (whose spin-waits then stretch every parallel op); this way it fills the idle moments instead.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            self._out = file_digests(paths, self._cancel)
        except BaseException as e:  # noqa: BLE001 - re-raised by result()
            self._error = e

    def result(self) -> list[dict]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out or []

    def cancel(self) -> None:
        self._cancel.set()

    def covers(self, paths: list[Path]) -> bool:
        """Whether this computes the digests of exactly ``paths`` (in order)."""
        return [p.resolve() for p in self.paths] == [Path(p).resolve() for p in paths]


def versions() -> dict:
    import torch

    def dist(name: str) -> str | None:
        # from the installed metadata: importing transformers only to read its version costs seconds
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "qconv": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__.split("+")[0],
        "transformers": dist("transformers"),
        "safetensors": dist("safetensors"),
    }


def _artifact_bytes(out_dir: Path) -> int:
    return sum(p.stat().st_size for p in out_dir.iterdir() if p.suffix in (".safetensors", ".gguf"))


def build_manifest(
    *, source, inputs, cfg, fmt_description, calibration, verification, tensors, plan, out_dir, dtype, argv
) -> dict:
    n_quant = sum(math.prod(source.shape(n)) for n in plan.grids)
    quant_bytes = sum(plan.nbytes.get(n, 0) for n in plan.grids)
    total_params = sum(math.prod(source.shape(n)) for n in plan.dense) + n_quant
    artifact = _artifact_bytes(out_dir)
    return {
        "qconv_version": __version__,
        "format": {"name": cfg["format"], "description": fmt_description},
        "command": argv,
        "input": {"model": source.name, "architecture": source.config.get("model_type"), "files": inputs},
        "config": cfg,
        "output_dtype": dtype,
        "calibration": calibration,
        "verification": verification,
        "summary": {
            "layers": source.num_layers,
            "quantized_tensors": len(plan.grids),
            "quantized_linears": len(plan.method),
            "notes": plan.notes,
            "kept_dense_linears": plan.ignored + ([] if source.tied else ["lm_head"]),
            "quantized_weights": n_quant,
            "parameters": total_params,
            # bits per quantized weight including its scales/zeros; and over the whole file
            "bits_per_weight": round(quant_bytes * 8 / max(n_quant, 1), 4),
            "bits_per_parameter": round(artifact * 8 / max(total_params, 1), 4),
            "artifact_bytes": artifact,
        },
        "tensors": tensors,
        "versions": versions(),
    }


def write_manifest(path: Path, manifest: dict) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def _eval_lines(ev: dict | None) -> list[str]:
    if not ev:
        return ["Not evaluated (run `qconv eval` or pass `--eval`)."]
    rows = [
        "| metric | value |",
        "| --- | --- |",
        f"| perplexity (quantized) | {ev['ppl']:.4f} |",
        f"| perplexity (base) | {ev['base_ppl']:.4f} |",
        f"| mean KL divergence vs base | {ev['kld_mean']:.6f} |",
        f"| top-1 agreement with base | {ev['top1_agreement'] * 100:.2f} % |",
    ]
    return rows + ["", f"Text: {ev['text']['source']}, {ev['chunks']} chunks of {ev['ctx']} tokens."]


def write_model_card(out_dir: Path, manifest: dict) -> None:
    cfg = manifest["config"]
    s = manifest["summary"]
    g = "per-channel" if cfg["group_size"] == -1 else f"group size {cfg['group_size']}"
    kept = "".join(", " + k for k in s["kept_dense_linears"])
    lines = [
        "---",
        "library_name: transformers",
        "tags: [qconv, quantized, compressed-tensors]",
        "---",
        "",
        f"# {Path(manifest['input']['model']).name} — {cfg['method'].upper()} {cfg['bits']}-bit",
        "",
        f"Quantized by [qconv](https://pypi.org/project/qconv/) {manifest['qconv_version']} with method "
        f"`{cfg['method']}`, {cfg['bits']}-bit {'symmetric' if cfg['symmetric'] else 'asymmetric'} integers, {g}, "
        f"stored as {manifest['format']['description']}.",
        "",
        f"- quantized linears: {s['quantized_linears']} of {s['layers']} decoder layers; kept in "
        f"{manifest['output_dtype']}: embeddings, norms{kept}",
        f"- bits per quantized weight (incl. scales and zeros): {s['bits_per_weight']}",
        f"- artifact size: {s['artifact_bytes'] / 2**20:.1f} MiB",
        f"- every packed tensor was re-dequantized and checked bit-exact before writing "
        f"({manifest['verification']['mode']}: {', '.join(manifest['verification']['paths']) or 'skipped'})",
        "",
        "## Quality",
        "",
        *_eval_lines(manifest.get("eval")),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer  # pip install compressed-tensors",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "```",
        "",
        "vLLM: `vllm serve PATH`.",
        "",
        "Full provenance (input hashes, configuration, per-tensor errors, versions) is in `qconv.json`.",
        "",
    ]
    (out_dir / "README.md").write_text("\n".join(lines))

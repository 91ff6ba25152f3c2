"""`qconv batch JOBS`: convert a model zoo from a YAML or CSV job file, with local worker processes or as tasks
on a Ray cluster, skipping jobs whose finished artifact already records the same conversion.

Three parts, in data-flow order:

- the job file → ``Job`` list (``load_jobs``): every field validated up front, errors name the file, the job's
  line and index and the field (exit 2 before anything runs);
- one job in a worker (``execute_job``): decide whether the artifact at the output is up to date (``decide``),
  else run ``qconv.pipeline.quantize`` — progress and logs go back to the driver as small event tuples;
- the driver (``run_batch``): local worker processes (``run_local``) or Ray tasks (``run_ray``), one rich display
  of every job (``BatchDisplay``), the summary table and the ``--json`` summary.

Local workers are ``multiprocessing`` *spawn* processes, one fresh process per job: torch is not fork-safe once
initialised (its thread pools and CUDA context do not survive ``fork``), a fresh process gives every job's memory
back to the OS, and a job that crashes its process (out-of-memory kill, segfault in a native kernel) fails alone
and is reported. A child process rather than a ``qconv quantize --json`` subprocess, so the job travels as the
validated config and layer progress comes back structured, not scraped from stderr.
"""

from __future__ import annotations

import copy
import csv
import difflib
import hashlib
import io
import json
import os
import queue as queue_mod
import re
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from qconv import __version__
from qconv.errors import InputError, QconvError

Event = tuple  # (kind, job index, *payload): start, task, advance, task_end, log, done

# ---------------------------------------------------------------------------------------------------------------
# The job file
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One job-file field. ``kind``: str, int, float, bool, list, choice, size, options. ``flag``: the matching
    `qconv quantize` flag (None: not a quantize setting). ``path``: a relative local path is resolved against the
    job file's folder. ``only``: "gguf" or "gptq" — fields that apply to that format / those methods only."""

    name: str
    kind: str
    help: str
    flag: str | None = ""
    choices: tuple = ()
    lo: float | None = None
    hi: float | None = None
    positive: bool = False  # strictly greater than lo
    path: bool = False
    only: str = ""

    @property
    def cli_flag(self) -> str | None:
        return ("--" + self.name.replace("_", "-")) if self.flag == "" else self.flag


FIELDS: dict[str, FieldSpec] = {
    f.name: f
    for f in (
        FieldSpec("model", "str", "HF folder, .gguf file, hub id or builtin:NAME (required)", None, path=True),
        FieldSpec("output", "str", "output folder, or the .gguf file for format gguf (required)", "--out", path=True),
        FieldSpec("name", "str", "label in the display and summary (default: the output's name)", None),
        FieldSpec("method", "str", "quantization method (`qconv methods`)"),
        FieldSpec("format", "str", "output format (`qconv methods`)"),
        FieldSpec("bits", "int", "weight bits", lo=1, hi=16),
        FieldSpec("group_size", "int", "input columns per scale; -1 per output channel", lo=-1),
        FieldSpec("sym", "bool", "symmetric grid (false: asymmetric)", "--sym/--asym"),
        FieldSpec("clip", "choice", "scale range", choices=("minmax", "mse")),
        FieldSpec("ignore", "list", "regexes of linears kept in full precision"),
        FieldSpec("calib", "str", "calibration text: file, folder, datasets name or preset", path=True),
        FieldSpec("calib_field", "str", "text field of json/parquet/dataset records"),
        FieldSpec("calib_samples", "int", "calibration samples", lo=1),
        FieldSpec("calib_seqlen", "int", "tokens per calibration sample", lo=1),
        FieldSpec("seed", "int", "calibration sampling seed"),
        FieldSpec("no_calib", "bool", "never use calibration data"),
        FieldSpec(
            "dtype", "choice", "dtype of scales and dense tensors", choices=("auto", "bfloat16", "float16", "float32")
        ),  # fmt: skip
        FieldSpec(
            "compute_dtype",
            "choice",
            "dtype of the calibration passes (auto: float32 on CPU, bfloat16 on GPU)",
            choices=("auto", "bfloat16", "float16", "float32"),
        ),  # fmt: skip
        FieldSpec("imatrix", "str", "'auto' or a llama.cpp imatrix file", path=True),
        FieldSpec("damp", "float", "GPTQ dampening", lo=0, positive=True, only="gptq"),
        FieldSpec("act_order", "bool", "GPTQ: descending Hessian diagonal order", only="gptq"),
        FieldSpec("static_groups", "bool", "GPTQ with act_order: static groups", only="gptq"),
        FieldSpec("gguf_type", "str", "llama-quantize file type", only="gguf"),
        FieldSpec("pure", "bool", "one type for every quantizable tensor", only="gguf"),
        FieldSpec("tensor_type", "list", "REGEX=TYPE per-tensor overrides", only="gguf"),
        FieldSpec("output_tensor_type", "str", "type of output.weight", only="gguf"),
        FieldSpec("token_embedding_type", "str", "type of token_embd.weight", only="gguf"),
        FieldSpec("leave_output_tensor", "bool", "keep output.weight in F16", only="gguf"),
        FieldSpec("split_max_size", "size", "llama.cpp splits of at most this size", only="gguf"),
        FieldSpec("gguf_pre", "str", "llama.cpp pre-tokenizer name", only="gguf"),
        FieldSpec("options", "options", "method/format settings (--opt KEY=VALUE)", "--opt"),
        FieldSpec("eval", "bool", "evaluate the artifact against the model after writing"),
        FieldSpec("eval_text", "str", "eval text file", path=True),
        FieldSpec("eval_chunks", "int", "eval chunks", lo=1),
        FieldSpec("eval_ctx", "int", "tokens per eval chunk", lo=8),
        FieldSpec("device", "str", "cpu or cuda[:N] (default cuda when gpus > 0)"),
        FieldSpec("batch_size", "int", "calibration samples per forward pass", lo=1),
        FieldSpec("verify", "choice", "re-dequantize packed tensors", choices=("auto", "kernel", "reference", "off")),
        FieldSpec("max_shard_size", "size", "largest safetensors shard"),
        FieldSpec("allow_pickle", "bool", "allow .bin pickle checkpoints"),
        FieldSpec("revision", "str", "hub revision"),
        FieldSpec(
            "cpus", "float", "CPUs the job takes (Ray resource; locally its torch threads)", None, lo=0, positive=True
        ),
        FieldSpec("gpus", "float", "GPUs the job takes (Ray resource)", None, lo=0),
    )
}
_GPTQ_METHODS = ("gptq", "awq+gptq")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


@dataclass
class Job:
    """One conversion: what `qconv quantize` would run, plus where it came from and what it needs."""

    index: int  # 1-based position in the file
    where: str  # "jobs.yaml:12: job 3", for messages
    name: str
    model: str
    output: str  # absolute
    cfg: object  # qconv.pipeline.QuantizeConfig
    run: object  # qconv.pipeline.RunOptions
    eval: dict | None  # {"text", "chunks", "ctx"} when the job evaluates its artifact
    cpus: float | None
    gpus: float
    argv: list[str]  # the equivalent `qconv quantize` command (recorded in the manifest)

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def format(self) -> str:
        return self.cfg.format


class _Loc(dict):
    """A YAML mapping that remembers its line and the line of each key (for error messages)."""

    line: int | None = None
    key_lines: dict


class _LineLoader:
    """A yaml SafeLoader whose mappings are ``_Loc`` (built lazily: importing yaml costs little, but only here)."""

    _cls = None

    @classmethod
    def get(cls):
        if cls._cls is None:
            import yaml

            class Loader(yaml.SafeLoader):
                pass

            def mapping(loader, node):
                loader.flatten_mapping(node)
                out = _Loc()
                out.line, out.key_lines = node.start_mark.line + 1, {}
                for k_node, v_node in node.value:
                    key = loader.construct_object(k_node, deep=True)
                    if not isinstance(key, str):
                        raise yaml.constructor.ConstructorError(
                            None, None, f"field names are strings, not {key!r}", k_node.start_mark
                        )
                    if key in out:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"field {key!r} given twice", k_node.start_mark
                        )
                    out[key] = loader.construct_object(v_node, deep=True)
                    out.key_lines[key] = k_node.start_mark.line + 1
                return out

            Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
            cls._cls = Loader
        return cls._cls


class _FieldError(Exception):
    """A problem with one field's value; ``load_jobs`` turns it into an InputError with the location."""


def _convert(spec: FieldSpec, raw, base_dir: Path):
    """A field's raw value (YAML scalar/list/mapping, or a CSV cell string) → its typed value."""
    kind = spec.kind
    if kind in ("str", "choice"):
        if isinstance(raw, (bool, list, dict)) or raw is None:
            raise _FieldError(f"expected a string, got {raw!r}")
        value = str(raw).strip()
        if not value:
            raise _FieldError("is empty")
        if kind == "choice" and value not in spec.choices:
            raise _FieldError(f"{value!r}: choose one of {', '.join(spec.choices)}")
        if spec.path:
            value = _resolve_path(value, base_dir, spec.name)
        return value
    if kind in ("int", "float"):
        return _number(spec, raw)
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        low = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise _FieldError(f"expected true or false, got {raw!r}")
    if kind == "list":
        items = raw.split(";") if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise _FieldError(f"expected a list of strings (in CSV: separated by ';'), got {raw!r}")
        return tuple(x.strip() for x in items if x.strip())
    if kind == "size":
        if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
            return str(raw)
        import click

        from qconv.cli import parse_size

        try:
            parse_size(str(raw))
        except click.BadParameter as e:
            raise _FieldError(e.message) from None
        return str(raw).strip()
    if kind == "options":
        return _options(raw)
    raise AssertionError(kind)


def _number(spec: FieldSpec, raw) -> int | float:
    what = "an integer" if spec.kind == "int" else "a number"
    if (
        isinstance(raw, bool)
        or not isinstance(raw, (int, float, str))
        or (spec.kind == "int" and isinstance(raw, float))
    ):
        raise _FieldError(f"expected {what}, got {raw!r}")
    try:
        value = int(raw) if spec.kind == "int" else float(raw)
    except ValueError:
        raise _FieldError(f"expected {what}, got {raw!r}") from None
    if spec.lo is not None and (value < spec.lo or (spec.positive and value == spec.lo)):
        raise _FieldError(f"{raw}: must be {'greater than' if spec.positive else 'at least'} {spec.lo:g}")
    if spec.hi is not None and value > spec.hi:
        raise _FieldError(f"{raw}: must be at most {spec.hi:g}")
    if spec.name == "group_size" and value == 0:
        raise _FieldError("0: use a positive size or -1 for per-channel")
    return value


def _options(raw) -> dict[str, str]:
    """``options``: a mapping, a list of "KEY=VALUE", or (CSV) "KEY=VALUE;KEY=VALUE" → {key: value as the CLI's
    --opt gives it (a string)}, so batch and `qconv quantize --opt` record the same config."""
    if isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        items = raw.split(";") if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise _FieldError(f"expected a mapping or KEY=VALUE strings, got {raw!r}")
        pairs = []
        for item in (x.strip() for x in items):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise _FieldError(f"{item!r}: expected KEY=VALUE")
            pairs.append((key.strip(), value.strip()))
    out = {}
    for key, value in pairs:
        if isinstance(value, (list, dict)) or value is None:
            raise _FieldError(f"{key}: expected a single value, got {value!r}")
        out[str(key)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def _resolve_path(value: str, base_dir: Path, field_name: str) -> str:
    """Relative local paths are relative to the job file's folder, so a job file means the same wherever it is
    run from. Models, calibration sources and the imatrix may also be names (hub ids, presets, 'auto'): those stay
    as given unless such a path exists or the value is written as a path (./, ../, /, ~)."""
    if field_name == "imatrix" and value == "auto":
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if field_name in ("output", "eval_text") or value.startswith((".", "~")) or (base_dir / p).exists():
        return str((base_dir / p).resolve())
    return value


def _where(path: Path, line: int | None, index: int | None) -> str:
    loc = f"{path}:{line}" if line else str(path)
    return f"{loc}: job {index}" if index is not None else f"{loc}: defaults"


def load_jobs(path: Path) -> list[Job]:
    """Read and validate a job file (.yaml/.yml/.json or .csv). Raises InputError naming the file, the job's
    line and index, and the field."""
    if not path.is_file():
        raise InputError(f"{path}: no such job file")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml", ".json"):
        raw_jobs, defaults = _read_yaml(path)
    elif suffix == ".csv":
        raw_jobs, defaults = _read_csv(path), _Loc()
    else:
        raise InputError(f"{path}: job files are .yaml, .yml, .json or .csv")
    if not raw_jobs:
        raise InputError(f"{path}: no jobs")
    base_dir = path.resolve().parent
    checked_defaults = _check_fields(defaults, path, defaults.line, None, base_dir)
    jobs = []
    for index, (line, fields) in enumerate(raw_jobs, 1):
        own = _check_fields(fields, path, line, index, base_dir)
        merged = {**checked_defaults, **own}
        if "options" in checked_defaults and "options" in own:
            merged["options"] = {**checked_defaults["options"], **own["options"]}
        key_lines = getattr(fields, "key_lines", {})
        jobs.append(_build_job(merged, index, lambda key=None, ln=line, kl=key_lines, i=index:
                               _where(path, kl.get(key, ln), i)))  # fmt: skip
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.output in seen:
            raise InputError(
                f"{job.where}: field 'output': {job.output} is also the output of job {seen[job.output].index}"
            )
        seen[job.output] = job
    return jobs


def _read_yaml(path: Path) -> tuple[list[tuple[int | None, dict]], _Loc]:
    import yaml

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LineLoader.get())  # a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{path}{line}: not valid YAML ({e.problem or e.context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    defaults = _Loc()
    if isinstance(data, dict):
        extra = sorted(set(data) - {"defaults", "jobs"})
        if extra:
            raise InputError(f"{path}:{data.key_lines[extra[0]]}: unknown top-level key {extra[0]!r} (a job file "
                             "is a list of jobs, or a mapping with 'jobs' and optional 'defaults')")  # fmt: skip
        defaults = data.get("defaults") or _Loc()
        if not isinstance(defaults, dict):
            raise InputError(f"{path}:{data.key_lines['defaults']}: 'defaults' must be a mapping of fields")
        data = data.get("jobs")
    if data is None:
        return [], defaults
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of jobs (or a mapping with 'jobs')")
    jobs = []
    for index, item in enumerate(data, 1):
        if not isinstance(item, dict):
            raise InputError(f"{path}: job {index}: expected a mapping of fields, got {item!r}")
        jobs.append((item.line, item))
    return jobs, defaults


def _read_csv(path: Path) -> list[tuple[int | None, dict]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    reader = csv.reader(io.StringIO(text, newline=""))  # quoted cells may span lines; line_num counts them
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return []
    except csv.Error as e:
        raise InputError(f"{path}:1: not valid CSV ({e})") from None
    for h in header:
        if not h:
            raise InputError(f"{path}:1: empty column name in the header")
        if h not in FIELDS:
            raise InputError(f"{path}:1: unknown column {h!r}{_suggest(h)}")
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise InputError(f"{path}:1: column {dup!r} appears twice")
    rows = []
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(header):
                raise InputError(f"{path}:{line}: {len(cells)} cells but the header has {len(header)} columns")
            rows.append((line, {h: c for h, c in zip(header, cells) if c.strip()}))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return rows


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, list(FIELDS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f"; fields: {', '.join(FIELDS)}"


def _check_fields(fields: dict, path: Path, line: int | None, index: int | None, base_dir: Path) -> dict:
    key_lines = getattr(fields, "key_lines", {})
    out = {}
    for key, raw in fields.items():
        where = _where(path, key_lines.get(key, line), index)
        if key not in FIELDS:
            raise InputError(f"{where}: unknown field {key!r}{_suggest(key)}")
        if index is None and key in ("output", "name"):
            raise InputError(f"{where}: field {key!r} belongs to each job, not to defaults")
        try:
            out[key] = _convert(FIELDS[key], raw, base_dir)
        except _FieldError as e:
            raise InputError(f"{where}: field {key!r}: {e}") from None
    return out


def _build_job(f: dict, index: int, loc: Callable[..., str]) -> Job:
    """Checked fields → a Job; the config is built exactly as `qconv quantize` builds it from its flags, so the
    same settings record the same manifest config (and give the same bytes) either way. ``loc(field)``: where the
    field (or, without one, the job) is in the file."""
    from qconv.formats.registry import WRITERS
    from qconv.methods import METHODS, MethodOptions
    from qconv.options import resolve
    from qconv.pipeline import QuantizeConfig, RunOptions

    def err(key: str, msg: str) -> InputError:
        return InputError(f"{loc(key)}: field {key!r}: {msg}")

    for key in ("model", "output"):
        if key not in f:
            raise InputError(f"{loc()}: field {key!r} is required")
    method, fmt = f.get("method", "rtn"), f.get("format", "safetensors")
    if method not in METHODS:
        raise err("method", f"{method!r} is not a method; available: {', '.join(METHODS)}")
    if fmt not in WRITERS:
        raise err("format", f"{fmt!r} is not a format; available: {', '.join(WRITERS)}")
    for key in f:
        only = FIELDS[key].only
        if only == "gguf" and fmt != "gguf":
            raise err(key, f"applies to format gguf (this job's format is {fmt})")
        if only == "gptq" and method not in _GPTQ_METHODS:
            raise err(key, f"applies to method gptq or awq+gptq (this job's method is {method})")
    if f.get("static_groups") and not f.get("act_order"):
        raise err("static_groups", "applies together with act_order: true")
    if fmt == "gguf" and "gguf_type" in f:
        from qconv.formats.gguf_mix import file_type

        try:
            file_type(f["gguf_type"])
        except InputError as e:
            raise err("gguf_type", str(e).removeprefix("--gguf-type ")) from None
    opts = f.get("options", {})
    try:
        resolve(opts, [(f"method {method}", METHODS[method].options), (f"format {fmt}", WRITERS[fmt].options)])
    except InputError as e:
        raise err("options", str(e).removeprefix("--opt ")) from None
    gpus = f.get("gpus", 0.0)
    device = f.get("device", "cuda" if gpus > 0 else "cpu")
    if not _DEVICE.fullmatch(device):
        raise err("device", f"{device!r}: choose cpu or cuda[:N]")
    uses_gptq = method in _GPTQ_METHODS
    imatrix = f.get("imatrix")
    method_options = {"no_calib": f.get("no_calib", False), "importance": imatrix or "none"}
    if uses_gptq:
        method_options |= {"damp": f.get("damp", 0.01), "act_order": f.get("act_order", False),
                           "static_groups": f.get("static_groups", False)}  # fmt: skip
    if f.get("no_calib") and METHODS[method](MethodOptions(f.get("clip", "minmax"), method_options)).needs_calibration:
        raise err("no_calib", f"method {method} needs calibration data")
    cfg = QuantizeConfig(
        opts=dict(opts), method=method, format=fmt, bits=f.get("bits", 4), group_size=f.get("group_size", 128),
        symmetric=f.get("sym", True), clip=f.get("clip", "minmax"), ignore=tuple(f.get("ignore", ())),
        calib=f.get("calib"), calib_field=f.get("calib_field"), calib_samples=f.get("calib_samples", 128),
        calib_seqlen=f.get("calib_seqlen", 512), seed=f.get("seed", 0), dtype=f.get("dtype", "auto"),
        compute_dtype=f.get("compute_dtype", "auto"), method_options=method_options,
    )  # fmt: skip
    from qconv.cli import parse_size

    if fmt == "gguf":
        split = f.get("split_max_size")
        cfg.format_options = {
            "gguf_type": f.get("gguf_type", "Q4_K_M"), "pure": f.get("pure", False),
            "tensor_type": tuple(f.get("tensor_type", ())), "output_tensor_type": f.get("output_tensor_type"),
            "token_embedding_type": f.get("token_embedding_type"), "leave_output": f.get("leave_output_tensor", False),
            "gguf_pre": f.get("gguf_pre"), "has_imatrix": imatrix is not None,
            "split_max_bytes": parse_size(split) if split else None,
        }  # fmt: skip
    run = RunOptions(device=device, batch_size=f.get("batch_size", 8), verify=f.get("verify", "auto"),
                     max_shard_bytes=parse_size(f.get("max_shard_size", "5GB")),
                     allow_pickle=f.get("allow_pickle", False), revision=f.get("revision"))  # fmt: skip
    ev = None
    if f.get("eval"):
        ev = {"text": f.get("eval_text"), "chunks": f.get("eval_chunks"), "ctx": f.get("eval_ctx", 512)}
    else:
        for key in ("eval_text", "eval_chunks", "eval_ctx"):
            if key in f:
                raise err(key, "applies with eval: true")
    output = f["output"]
    return Job(index=index, where=loc(), name=f.get("name") or Path(output).name, model=f["model"], output=output,
               cfg=cfg, run=run, eval=ev, cpus=f.get("cpus"), gpus=gpus, argv=_argv(f))  # fmt: skip


def _argv(f: dict) -> list[str]:
    """The `qconv quantize` command line equivalent to a job's fields (canonical order: the FIELDS table's)."""
    argv = ["qconv", "quantize", f["model"]]
    for spec in FIELDS.values():
        if spec.name not in f or spec.cli_flag is None:
            continue
        value = f[spec.name]
        if spec.name == "sym":
            argv.append("--sym" if value else "--asym")
        elif spec.kind == "bool":
            if value:
                argv.append(spec.cli_flag)
        elif spec.kind == "list":
            for item in value:
                argv += [spec.cli_flag, item]
        elif spec.kind == "options":
            for k, v in value.items():
                argv += ["--opt", f"{k}={v}"]
        else:
            argv += [spec.cli_flag, str(value)]
    return argv


# ---------------------------------------------------------------------------------------------------------------
# Is the artifact up to date?
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """``run``: convert (``replace``: an existing output is replaced — atomically, at the end); else skip."""

    run: bool
    reason: str
    replace: bool = False


def _is_file_format(job: Job) -> bool:
    from qconv.formats.registry import WRITERS

    return WRITERS[job.format].is_file


def manifest_path(job: Job) -> Path:
    out = Path(job.output)
    return out.with_name(out.name + ".qconv.json") if _is_file_format(job) else out / "qconv.json"


def artifact_files(job: Job) -> list[Path]:
    """The artifact's weight files on disk (what the manifest's ``artifact_bytes`` counts)."""
    out = Path(job.output)
    if not _is_file_format(job):
        return sorted(p for p in out.iterdir() if p.suffix in (".safetensors", ".gguf")) if out.is_dir() else []
    if out.is_file():
        return [out]
    # llama.cpp splits: model.gguf → model-00001-of-0000N.gguf …
    return sorted(
        out.parent.glob(f"{glob_escape(out.stem)}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf")
    )


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def effective_config(cfg) -> dict:
    """The ``config`` the pipeline records in the manifest for ``cfg`` (after it resolves --opt values against the
    method's and format's declarations and adjusts act-order for formats without g_idx), as JSON gives it back.
    The pipeline's own qconv.pipeline.effective_options decides it."""
    from qconv.pipeline import effective_options

    cfg = copy.deepcopy(cfg)
    cfg.method_options = effective_options(cfg)[0]
    return json.loads(json.dumps(cfg.manifest()))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(recorded: dict, expected: dict) -> list[str]:
    """Human lines "key old → new" for every setting that differs (nested dicts flattened with dots)."""
    a, b = _flat(recorded), _flat(expected)
    return [f"{k} {a.get(k, '—')} → {b.get(k, '—')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered under qconv's cache keyed by (path, size, mtime, inode): a re-run of a zoo
    does not re-read hundreds of GB of unchanged checkpoints (the quick check make and rsync trust)."""
    from qconv.manifest import sha256_file
    from qconv.model.source import cache_root

    path = path.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}".encode()).hexdigest()
    entry = cache_root() / "digests" / key[:40]
    try:
        value = entry.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    except OSError:
        pass
    value = sha256_file(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return value


def decide(job: Job, force: bool = False) -> Decision:
    """Whether ``job`` must run. Up to date (skip) means: a manifest at the output that parses, written by this
    qconv version, whose recorded config equals the job's effective config, whose weight files are all there
    (total bytes equal the recorded ``artifact_bytes``), whose eval (if the job asks for one) used the same text,
    chunks and context, and whose input files (names, sizes, sha256) are the model's files now. Calibration text
    and imatrix files are matched by name, not content. An output that exists but holds no readable manifest is
    not replaced without ``force`` (InputError)."""
    out = Path(job.output)
    mpath = manifest_path(job)
    files = artifact_files(job)
    if not out.exists() and not mpath.exists() and not files:
        return Decision(True, "new")
    if force:
        return Decision(True, "--force", replace=True)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        recorded = manifest["config"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(
            f"{out}: exists and is not a qconv artifact (no readable {mpath.name}); pass --force to replace it"
        ) from None
    if manifest.get("qconv_version") != __version__:
        return Decision(True, f"qconv version {manifest.get('qconv_version')} → {__version__}", replace=True)
    diff = config_diff(recorded, effective_config(job.cfg))
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        return Decision(True, "settings changed: " + "; ".join(diff[:3]) + more, replace=True)
    on_disk = sum(p.stat().st_size for p in files)
    want = (manifest.get("summary") or {}).get("artifact_bytes")
    if not files or on_disk != want:
        return Decision(True, f"artifact incomplete ({on_disk} bytes on disk, manifest records {want})", replace=True)
    if job.eval is not None:
        ev = manifest.get("eval") or {}
        source = str(Path(job.eval["text"]).expanduser()) if job.eval["text"] else "qconv-default-eval"
        same = ev.get("ctx") == job.eval["ctx"] and (ev.get("text") or {}).get("source") == source
        if not same or (job.eval["chunks"] is not None and ev.get("chunks") != job.eval["chunks"]):
            return Decision(True, "no evaluation with these settings in the manifest", replace=True)
    changed = _changed_inputs(job, (manifest.get("input") or {}).get("files") or [])
    if changed:
        return Decision(True, f"input changed: {changed}", replace=True)
    return Decision(False, "up to date")


def _changed_inputs(job: Job, recorded: list) -> str | None:
    from qconv.model.source import open_source

    source = open_source(job.model, allow_pickle=job.run.allow_pickle, revision=job.run.revision)
    try:
        paths = [Path(p) for p in source.input_files]
    finally:
        source.close()
    now = {p.name: (p.stat().st_size, p) for p in paths}
    before = {r.get("name"): (r.get("bytes"), r.get("sha256")) for r in recorded if isinstance(r, dict)}
    if set(now) != set(before):
        return ", ".join(sorted(set(now) ^ set(before))[:3])
    for name, (size, p) in sorted(now.items()):
        if size != before[name][0] or cached_sha256(p) != before[name][1]:
            return name
    return None


# ---------------------------------------------------------------------------------------------------------------
# One job, in a worker
# ---------------------------------------------------------------------------------------------------------------


class JobReporter:
    """The Reporter interface the pipeline uses (``log``, ``task``), sending events to the batch driver instead
    of drawing. Advances are coalesced to a few per second; ``emit`` never raises into the pipeline."""

    quiet = False
    live = False

    def __init__(self, emit: Callable[[Event], None], index: int, every: float = 0.25):
        self._emit, self.index, self.every = emit, index, every
        self._t0 = time.perf_counter()

    def send(self, *event) -> None:
        try:
            self._emit((event[0], self.index, *event[1:]))
        except Exception:  # noqa: BLE001 - a lost progress event must not fail the conversion
            pass

    def log(self, msg: str) -> None:
        self.send("log", msg)

    def task(self, description: str, total: int | None, unit: str = ""):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            self.send("task", description, total)
            state = {"pending": 0, "last": time.perf_counter(), "detail": ""}

            def advance(n: int = 1, detail: str = "") -> None:
                state["pending"] += n
                state["detail"] = detail
                now = time.perf_counter()
                if now - state["last"] >= self.every:
                    self.send("advance", state["pending"], detail)
                    state["pending"], state["last"] = 0, now

            try:
                yield advance
            finally:
                if state["pending"]:
                    self.send("advance", state["pending"], state["detail"])
                self.send("task_end", description)

        return cm()

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0


def _result(job: Job, status: str, t0: float, **kw) -> dict:
    return {
        "index": job.index,
        "name": job.name,
        "model": job.model,
        "output": job.output,
        "method": job.method,
        "format": job.format,
        "status": status,  # ok, skipped or failed
        "reason": kw.get("reason"),
        "error": kw.get("error"),
        "exit_code": kw.get("exit_code", 0),
        "seconds": round(time.perf_counter() - t0, 2),
        "started_at": round(time.time() - (time.perf_counter() - t0), 3),  # epoch seconds
        "worker": kw.get("worker"),  # {"host", "pid"} of the process that ran it (None: decided by the driver)
        "summary": kw.get("summary"),
    }


def one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    first = msg.splitlines()[0]
    return first if isinstance(e, QconvError) else f"{type(e).__name__}: {first}"


def execute_job(job: Job, force: bool, emit: Callable[[Event], None]) -> dict:
    """Run one job where it was scheduled; never raises: the result dict says ok / skipped / failed."""
    t0 = time.perf_counter()
    reporter = JobReporter(emit, job.index)
    reporter.send("start")
    worker = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        if job.run.verify == "kernel" and not job.run.device.startswith("cuda"):
            os.environ.setdefault("TRITON_INTERPRET", "1")
        decision = decide(job, force)
        if not decision.run:
            return _result(job, "skipped", t0, reason=decision.reason, worker=worker)
        reporter.log(f"running ({decision.reason})")
        from qconv.pipeline import quantize

        eval_fn = None
        if job.eval is not None:
            from qconv.eval import evaluate

            def eval_fn(path):
                ev = job.eval
                return evaluate(str(path), job.model, ev["text"], ev["chunks"], ev["ctx"], job.run.device,
                                reporter=reporter)  # fmt: skip

        run = replace(job.run, force=job.run.force or decision.replace)
        summary = quantize(job.model, Path(job.output), copy.deepcopy(job.cfg), run, reporter, argv=job.argv,
                           eval_fn=eval_fn)  # fmt: skip
        return _result(job, "ok", t0, reason=decision.reason, summary=summary, worker=worker)
    except KeyboardInterrupt:
        return _result(job, "failed", t0, error="interrupted; nothing was written", exit_code=130, worker=worker)
    except Exception as e:  # noqa: BLE001 - a failing job is reported, the batch goes on
        code = e.exit_code if isinstance(e, QconvError) else 1
        return _result(job, "failed", t0, error=one_line(e), exit_code=code, worker=worker)


# ---------------------------------------------------------------------------------------------------------------
# Local workers
# ---------------------------------------------------------------------------------------------------------------


def _interrupt_once(signum, frame):
    """SIGTERM (the driver stopping us) or SIGINT → one KeyboardInterrupt, so the pipeline discards its temporary
    output; further signals are ignored while it cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _local_worker(job: Job, force: bool, events, threads: int, log: str) -> None:
    """Entry point of a spawned worker process. Its stdout and stderr (library warnings, native crash messages) go
    to ``log``: stdout belongs to the driver's --json, stderr to the one display."""
    signal.signal(signal.SIGTERM, _interrupt_once)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored like the driver (nohup, `cmd &`)
        signal.signal(signal.SIGINT, _interrupt_once)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(max(1, threads))
    result = execute_job(job, force, events.put)
    events.put(("done", job.index, result))


def _last_line(path: Path) -> str:
    try:
        lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _crashed(job: Job, exitcode: int | None, t0: float, log: Path) -> dict:
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = f"signal {-exitcode}"
        why = f"worker process killed by {sig}" + (" (out of memory?)" if exitcode == -signal.SIGKILL else "")
    else:
        why = f"worker process exited with code {exitcode} without a result"
    last = _last_line(log)
    return _result(job, "failed", t0, error=why + (f"; its last output: {last}" if last else ""), exit_code=1)


def _discard_temp(job: Job, since: float) -> None:
    """A worker that died without cleaning up (killed, crashed) leaves the pipeline's temporary output next to the
    target: remove the ones made since the job started (outputs are unique within a batch, so they are its)."""
    import shutil

    out = Path(job.output)
    for tmp in out.parent.glob(f"{glob_escape('.' + out.name)}.qconv-tmp-*"):
        try:
            if tmp.stat().st_mtime >= since - 1:
                shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        except OSError:
            pass


def run_local(jobs: list[Job], workers: int, force: bool, display: BatchDisplay) -> dict[int, dict]:
    """Run ``jobs`` in at most ``workers`` spawned processes at a time; returns index → result."""
    import multiprocessing as mp
    import shutil
    import tempfile

    ctx = mp.get_context("spawn")
    logdir = Path(tempfile.mkdtemp(prefix="qconv-batch-"))
    events = ctx.Queue()
    pending = deque(jobs)
    running: dict[int, tuple] = {}  # index → (process, job, perf_counter and epoch at start)
    results: dict[int, dict] = {}
    slots = max(1, min(workers, len(jobs)))
    cores = os.cpu_count() or 1

    def drain(timeout: float) -> None:
        try:
            ev = events.get(timeout=timeout) if timeout else events.get_nowait()
            while True:
                if ev[0] == "done":
                    results[ev[1]] = ev[2]
                display.event(ev)
                ev = events.get_nowait()
        except queue_mod.Empty:
            pass

    try:
        while pending or running:
            while pending and len(running) < slots:
                job = pending.popleft()
                threads = int(job.cpus) if job.cpus else max(1, cores // slots)
                log = logdir / f"job-{job.index}.log"
                p = ctx.Process(target=_local_worker, args=(job, force, events, threads, str(log)), daemon=True)
                p.start()
                running[job.index] = (p, job, time.perf_counter(), time.time())
            drain(0.2)
            for index, (p, job, t0, started) in list(running.items()):
                if p.is_alive():
                    continue
                p.join()
                if index not in results:
                    drain(0.5)  # its last events may still be in the pipe
                if index not in results:
                    results[index] = _crashed(job, p.exitcode, t0, logdir / f"job-{index}.log")
                    _discard_temp(job, started)
                    display.event(("done", index, results[index]))
                del running[index]
            display.tick()
    except KeyboardInterrupt:
        for p, *_ in running.values():
            p.terminate()  # → KeyboardInterrupt in the worker: it discards its temporary output
        for p, *_ in running.values():
            p.join(30)
            if p.is_alive():
                p.kill()
        raise
    finally:
        events.close()
        # Keep what a worker printed when its job failed other than on bad input (a native crash's message, a
        # traceback's context): the result names the file. Bad input is explained by its one-line error.
        for r in results.values():
            log = logdir / f"job-{r['index']}.log"
            if r["status"] == "failed" and r["exit_code"] != 2 and log.is_file() and log.stat().st_size:
                r["log"] = str(log)
        if not any("log" in r for r in results.values()):
            shutil.rmtree(logdir, ignore_errors=True)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------------------------


def _ray_task(job: Job, force: bool, events) -> dict:
    """A job as a Ray task: progress through a ray.util.queue.Queue (an actor the driver reads)."""
    if job.cpus:
        import torch

        torch.set_num_threads(max(1, int(job.cpus)))
    return execute_job(job, force, lambda ev: events.put(ev, timeout=10))


def _ray_feasible(job: Job, nodes: list[dict]) -> bool:
    need_cpu, need_gpu = job.cpus or 1.0, job.gpus
    return any(
        n.get("Resources", {}).get("CPU", 0) >= need_cpu and n.get("Resources", {}).get("GPU", 0) >= need_gpu
        for n in nodes
    )


def run_ray(jobs: list[Job], address: str, workers: int | None, force: bool, display: BatchDisplay) -> dict[int, dict]:
    """Each job a Ray task on the cluster at ``address`` with its ``cpus``/``gpus`` as resources (at most
    ``workers`` in flight, default all). A job no node can host fails at once instead of waiting forever."""
    try:
        import ray
        from ray.util.queue import Queue
    except ImportError:
        raise InputError("--ray needs the ray package: pip install 'qconv[ray]'") from None
    import logging

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as e:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ValueError …
        raise InputError(f"--ray {address}: cannot connect to a Ray cluster ({one_line(e)})") from None
    results: dict[int, dict] = {}
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        events = Queue(actor_options={"num_cpus": 0})  # takes no CPU a job could use
        task = ray.remote(max_calls=1)(_ray_task)  # a fresh worker process per job, as locally
        pending = deque()
        for job in jobs:
            if _ray_feasible(job, nodes):
                pending.append(job)
            else:
                err = (f"needs {job.cpus or 1:g} CPU and {job.gpus:g} GPU on one node; no node of the Ray cluster at "
                       f"{address} has them")  # fmt: skip
                results[job.index] = _result(job, "failed", time.perf_counter(), error=err, exit_code=1)
                display.event(("done", job.index, results[job.index]))
        limit = workers or len(jobs)
        inflight: dict = {}  # ObjectRef → (job, t0)
        try:
            _ray_loop(ray, task, events, pending, inflight, limit, force, results, display)
        except KeyboardInterrupt:
            for ref in inflight:
                ray.cancel(ref)  # → KeyboardInterrupt in the task: it discards its temporary output
            raise
        events.shutdown()
    finally:
        ray.shutdown()
    return results


def _ray_loop(ray, task, events, pending: deque, inflight: dict, limit: int, force: bool, results: dict,
              display: BatchDisplay) -> None:  # fmt: skip
    """Submit up to ``limit`` tasks at a time; relay their events; collect their results."""
    while pending or inflight:
        while pending and len(inflight) < limit:
            job = pending.popleft()
            ref = task.options(num_cpus=job.cpus or 1, num_gpus=job.gpus, max_retries=0,
                               name=f"qconv-batch:{job.name}").remote(job, force, events)  # fmt: skip
            inflight[ref] = (job, time.perf_counter())
        ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0.2)
        for ev in events.get_nowait_batch(events.qsize()):
            display.event(ev)
        for ref in ready:
            job, t0 = inflight.pop(ref)
            try:
                results[job.index] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - worker died, node lost, out of memory …
                results[job.index] = _result(job, "failed", t0, error=f"Ray: {one_line(e)}", exit_code=1)
            display.event(("done", job.index, results[job.index]))
        display.tick()


# ---------------------------------------------------------------------------------------------------------------
# Display and summary
# ---------------------------------------------------------------------------------------------------------------


class BatchDisplay:
    """All jobs on one rich display: a row per job (status, its current stage's bar, elapsed) under a batch row,
    on a terminal; plain job-level lines (start, result, a heartbeat every 30 s) in logs; nothing when quiet."""

    STYLE = {"ok": "green", "skipped": "cyan", "failed": "red"}

    def __init__(self, jobs: list[Job], quiet: bool = False, console=None, heartbeat: float = 30.0):
        from rich.console import Console

        if console is None:
            console = Console(stderr=True)
            if not console.is_terminal:  # logs: wide enough that paths and errors stay on one line
                console = Console(stderr=True, width=200)
        self.jobs = {j.index: j for j in jobs}
        self.quiet = quiet
        self.console = console
        self.live = self.console.is_terminal and not quiet
        self.heartbeat = heartbeat
        self.state = {j.index: {"status": "queued", "stage": "", "total": None, "done": 0, "t": None} for j in jobs}
        self.results: dict[int, dict] = {}
        self._progress = None
        self._rows: dict[int, int] = {}
        self._last_beat = time.perf_counter()

    def _label(self, index: int) -> str:
        from rich.markup import escape

        return f"[{index}/{len(self.jobs)}] {escape(self.jobs[index].name)}"

    def __enter__(self) -> BatchDisplay:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.fields[label]}"),
                TextColumn("{task.fields[status]}"),
                BarColumn(bar_width=30),
                TextColumn("{task.fields[detail]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._progress.__enter__()
            self._overall = self._progress.add_task("batch", total=len(self.jobs), label="[bold]batch[/]",
                                                    status="", detail="")  # fmt: skip
            for index in self.jobs:
                self._rows[index] = self._progress.add_task(str(index), total=1, start=False, label=self._label(index),
                                                            status="[dim]queued[/]", detail="")  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def _print(self, msg: str) -> None:
        if self.quiet:
            return
        console = self._progress.console if self._progress is not None else self.console
        console.print(msg, highlight=False, soft_wrap=True)

    def event(self, ev: Event) -> None:
        kind, index = ev[0], ev[1]
        st = self.state[index]
        if kind == "start":
            st.update(status="running", t=time.perf_counter())
            if self.live:
                self._progress.start_task(self._rows[index])
                self._update(index, status="[yellow]running[/]")
            else:
                self._print(f"{self._label(index)}: started")
        elif kind == "task":
            st.update(stage=ev[2], total=ev[3], done=0)
            if self.live:
                self._progress.update(self._rows[index], total=ev[3], completed=0)
                self._update(index)
        elif kind == "advance":
            st["done"] += ev[2]
            if self.live:
                self._progress.update(self._rows[index], advance=ev[2])
                self._update(index)
        elif kind == "task_end":
            return  # the job's own row is finished by its result, not by the end of a task
        elif kind == "log":
            self._print(f"{self._label(index)}: {ev[2]}")
        elif kind == "done":
            self._done(index, ev[2])

    def _update(self, index: int, status: str | None = None) -> None:
        st = self.state[index]
        detail = st["stage"] + (f" {st['done']}/{st['total']}" if st["total"] else "")
        fields = {"detail": detail} if status is None else {"detail": detail, "status": status}
        self._progress.update(self._rows[index], **fields)

    def _done(self, index: int, r: dict) -> None:
        self.results[index] = r
        self.state[index]["status"] = r["status"]
        from rich.markup import escape

        out = (r.get("summary") or {}).get("output", r["output"])
        what = escape({"ok": f"ok in {r['seconds']:.1f} s → {out}", "skipped": f"skipped ({r['reason']})",
                       "failed": f"failed: {r['error']}"}[r["status"]])  # fmt: skip
        style = self.STYLE[r["status"]]
        if self.live:
            row = self._rows[index]
            if not next(t for t in self._progress.tasks if t.id == row).started:
                self._progress.start_task(row)
            self._progress.update(row, total=1, completed=1, status=f"[{style}]{r['status']}[/]",
                                  detail=escape(r["reason"]) if r["status"] == "skipped" else "")  # fmt: skip
            self._progress.stop_task(row)
            self._progress.update(self._overall, advance=1, detail=self._counts())
            if r["status"] == "failed":
                self._print(f"[red]{self._label(index)}: {what}[/]")
        else:
            self._print(f"{self._label(index)}: {what}")

    def _counts(self) -> str:
        n = {s: sum(1 for r in self.results.values() if r["status"] == s) for s in ("ok", "skipped", "failed")}
        return " · ".join(f"{v} {k}" for k, v in n.items())

    def tick(self) -> None:
        """Called by the driver loop: the heartbeat of running jobs in logs."""
        if self.live or self.quiet or time.perf_counter() - self._last_beat < self.heartbeat:
            return
        self._last_beat = time.perf_counter()
        for index, st in self.state.items():
            if st["status"] == "running":
                where = f"{st['stage']} {st['done']}/{st['total'] or '?'}" if st["stage"] else "starting"
                self._print(f"{self._label(index)}: {where} ({time.perf_counter() - st['t']:.0f} s)")

    def summary_table(self, results: list[dict]) -> None:
        if self.quiet:
            return
        from rich.markup import escape
        from rich.table import Table

        table = Table(title="qconv batch", title_justify="left")
        for col in ("#", "job", "method", "format", "status", "seconds", "bits/w", "output / reason / error"):
            table.add_column(col, overflow="fold", justify="right" if col in ("#", "seconds", "bits/w") else "left")
        for r in results:
            s = r.get("summary") or {}
            note = {"ok": s.get("output", r["output"]), "skipped": r["reason"], "failed": r["error"]}[r["status"]]
            table.add_row(str(r["index"]), escape(r["name"]), r["method"], r["format"],
                          f"[{self.STYLE[r['status']]}]{r['status']}[/]", f"{r['seconds']:.1f}",
                          str(s.get("bits_per_weight", "")), escape(str(note)))  # fmt: skip
        self.console.print(table)
        self.console.print(self._counts(), highlight=False)


def run_batch(jobs_file: str, workers: int | None = None, ray_address: str | None = None, force: bool = False,
              quiet: bool = False, console=None) -> dict:  # fmt: skip
    """`qconv batch`: returns the summary (``exit_code`` 0, or 1 when any job failed). A bad job file raises
    InputError before any job runs."""
    if workers is not None and workers < 1:
        raise InputError(f"--jobs {workers}: must be at least 1")
    t0 = time.perf_counter()
    jobs = load_jobs(Path(jobs_file))
    display = BatchDisplay(jobs, quiet, console)
    with display:
        if ray_address:
            results = run_ray(jobs, ray_address, workers, force, display)
        else:
            results = run_local(jobs, workers or 1, force, display)
    ordered = [results[j.index] for j in jobs]
    display.summary_table(ordered)
    counts = {s: sum(1 for r in ordered if r["status"] == s) for s in ("ok", "skipped", "failed")}
    failed = counts["failed"] > 0
    return {
        "ok": not failed,
        "exit_code": 1 if failed else 0,
        "jobs_file": str(Path(jobs_file).resolve()),
        "runner": f"ray {ray_address}" if ray_address else f"local ×{max(1, min(workers or 1, len(jobs)))}",
        "counts": counts,
        "seconds": round(time.perf_counter() - t0, 2),
        "jobs": ordered,
        "qconv_version": __version__,
    }


__all__ = ["FIELDS", "BatchDisplay", "Job", "decide", "execute_job", "load_jobs", "run_batch"]

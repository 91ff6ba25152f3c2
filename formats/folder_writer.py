"""The Hugging Face folder every packed format writes: sharded safetensors streamed in plan order, config.json with
the format's ``quantization_config``, and the tokenizer files. Formats subclass it and give only what differs: the
tensors one linear becomes (``pack``, verified there) and the config block."""

from __future__ import annotations

import json
from abc import abstractmethod

import torch

from qconv.formats.base import FormatWriter, Plan, WriteContext
from qconv.formats.hf_folder import copy_tokenizer, write_config
from qconv.formats.safetensors_io import ShardedSafetensorsWriter


class SafetensorsFolderWriter(FormatWriter):
    # also written as quantize_config.json (what GPTQ loaders read besides config.json)
    config_copy: str | None = None

    _writer: ShardedSafetensorsWriter | None = None

    @abstractmethod
    def pack(self, module: str, qt) -> dict[str, torch.Tensor]:
        """One linear's stored tensors (suffix → tensor), already verified against ``qt``'s dequantization."""

    @abstractmethod
    def quantization_config(self, ctx: WriteContext) -> dict:
        """config.json's ``quantization_config`` block (InputError when the planned grids cannot share one)."""

    def begin(self, plan: Plan, ctx: WriteContext) -> None:
        self._writer = ShardedSafetensorsWriter(self.out_dir, plan.specs, self.max_shard_bytes)

    def write_quantized(self, name: str, qt) -> None:
        assert self._writer is not None
        module = name.removesuffix(".weight")
        for suffix, t in self.pack(module, qt).items():
            self._writer.write(f"{module}.{suffix}", t)

    def write_dense(self, name: str, tensor: torch.Tensor) -> None:
        assert self._writer is not None
        self._writer.write(name, tensor)

    def finish(self, ctx: WriteContext) -> list[str]:
        assert self._writer is not None
        files = self._writer.close()
        qc = self.quantization_config(ctx)
        write_config(self.out_dir, {**ctx.config, "quantization_config": qc}, ctx.dtype)
        extra = []
        if self.config_copy:
            (self.out_dir / self.config_copy).write_text(json.dumps(qc, indent=2, sort_keys=True) + "\n")
            extra.append(self.config_copy)
        index = ["model.safetensors.index.json"] if len(files) > 1 else []
        tokenizer = copy_tokenizer(ctx.source.tokenizer_dir(), self.out_dir) if ctx.source is not None else []
        return [*files, *index, "config.json", *extra, *tokenizer]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()

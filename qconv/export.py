"""`qconv convert`: any readable checkpoint (GGUF, a quantized folder qconv reads, a safetensors folder) to a
plain Hugging Face safetensors folder in a chosen dtype, streamed tensor by tensor.

Optionally ``transform(name, tensor) -> tensor`` rewrites each tensor on the way (the dithered test model uses
it); it sees tensors in the source's dtype as float32 and its result is cast to the output dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from qconv.formats.hf_folder import AtomicOutput, copy_tokenizer, write_config
from qconv.formats.safetensors_io import ShardedSafetensorsWriter, TensorSpec
from qconv.model.source import TensorSource, open_source
from qconv.progress import Reporter


def export_dense(
    source: TensorSource,
    out: Path,
    dtype: torch.dtype,
    force: bool = False,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    reporter: Reporter | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    reporter = reporter or Reporter(quiet=True)
    output = AtomicOutput(out, force, is_dir=True, inputs=source.input_files)
    names = source.names()
    specs = [TensorSpec(n, source.shape(n), dtype) for n in names]
    writer = ShardedSafetensorsWriter(output.path, specs, max_shard_bytes)
    try:
        with reporter.task("converting tensors", len(names)) as advance:
            for n in names:
                t = source.read(n)
                if transform is not None:
                    t = transform(n, t.float())
                writer.write(n, t.to(dtype))
                advance(1)
        writer.close()
        config = {k: v for k, v in source.config.items() if k != "quantization_config"}
        write_config(output.path, config, dtype)
        copy_tokenizer(source.tokenizer_dir(), output.path)
        return output.commit()
    except BaseException:
        writer.abort()
        output.discard()
        raise


def convert(model: str, out: Path, dtype: torch.dtype, force: bool = False, reporter: Reporter | None = None) -> Path:
    source = open_source(model)
    try:
        return export_dense(source, out, dtype, force, reporter=reporter)
    finally:
        source.close()

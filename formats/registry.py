"""The format tables: ``--format`` names → writer classes, and config ``quant_method`` → reader classes."""

from __future__ import annotations

from qconv.formats.base import FormatWriter
from qconv.formats.compressed_tensors import CompressedTensorsSource, CompressedTensorsWriter
from qconv.formats.gguf import GGUFFormat

WRITERS: dict[str, type[FormatWriter]] = {w.name: w for w in (CompressedTensorsWriter, GGUFFormat)}

# quantization_config.quant_method → a TensorSource wrapping the raw folder that dequantizes on read
READERS = {"compressed-tensors": CompressedTensorsSource}

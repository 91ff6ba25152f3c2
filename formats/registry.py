"""The format tables: ``--format`` names → writer classes, and config ``quant_method`` → reader classes."""

from __future__ import annotations

from qconv.formats.awq import AWQSource, AWQWriter
from qconv.formats.base import FormatWriter
from qconv.formats.bnb import BnbSource, BnbWriter
from qconv.formats.compressed_tensors import CompressedTensorsSource, CompressedTensorsWriter
from qconv.formats.fp8_block import Fp8BlockSource, Fp8BlockWriter
from qconv.formats.gguf import GGUFFormat
from qconv.formats.gptq import GPTQSource, GPTQWriter
from qconv.formats.hqq import HQQSource, HQQWriter

WRITERS: dict[str, type[FormatWriter]] = {
    w.name: w
    for w in (CompressedTensorsWriter, GGUFFormat, GPTQWriter, AWQWriter, HQQWriter, BnbWriter, Fp8BlockWriter)
}

# quantization_config.quant_method → a TensorSource wrapping the raw folder that dequantizes on read
READERS = {
    "compressed-tensors": CompressedTensorsSource,
    "gptq": GPTQSource,
    "awq": AWQSource,
    "hqq": HQQSource,
    "bitsandbytes": BnbSource,
    "fp8": Fp8BlockSource,
}

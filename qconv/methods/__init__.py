"""The name → method table. A method is a class taking MethodOptions (see base.py)."""

from __future__ import annotations

from qconv.methods.awq import AWQ, AWQGPTQ
from qconv.methods.base import LayerContext, Method, MethodOptions
from qconv.methods.fp8 import FP8
from qconv.methods.gptq import GPTQ
from qconv.methods.hqq import HQQ
from qconv.methods.mx import MXFP4, NVFP4
from qconv.methods.nf4 import FP4, NF4
from qconv.methods.rtn import RTN

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, AWQ, AWQGPTQ, HQQ, NF4, FP4, FP8, MXFP4, NVFP4)}

__all__ = ["METHODS", "LayerContext", "Method", "MethodOptions"]

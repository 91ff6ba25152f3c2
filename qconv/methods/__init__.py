"""The name → method table. A method is a class taking MethodOptions (see base.py)."""

from __future__ import annotations

from qconv.methods.awq import AWQ, AWQGPTQ
from qconv.methods.base import LayerContext, Method, MethodOptions
from qconv.methods.gptq import GPTQ
from qconv.methods.rtn import RTN

METHODS: dict[str, type[Method]] = {m.name: m for m in (RTN, GPTQ, AWQ, AWQGPTQ)}

__all__ = ["METHODS", "LayerContext", "Method", "MethodOptions"]

"""Optional Triton import (the package works without it: CPU, reference path), and lazy kernel compilation.

``triton.jit`` decides at decoration time between a compiled kernel and the CPU interpreter (TRITON_INTERPRET=1).
Kernels here are declared with ``lazy_jit`` instead, which jits on first launch in whatever mode is current then,
so `--verify kernel` can switch a process to the interpreter after triton was imported.
"""

from __future__ import annotations

import os
import threading

try:  # triton is the `gpu` extra
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised on machines without the extra
    triton = None
    tl = None
    HAVE_TRITON = False


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_device_ok(t) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    return HAVE_TRITON and (t.is_cuda or interpret_mode())


class lazy_jit:  # noqa: N801 - used as a decorator, like triton.jit
    """``@lazy_jit`` on a Triton kernel function: ``kernel[grid](...)`` jits it for the current mode."""

    def __init__(self, fn):
        self.fn = fn
        self._jitted: dict[bool, object] = {}

    def __getitem__(self, grid):
        mode = interpret_mode()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn)
        launch = self._jitted[mode][grid]
        if not mode:
            return launch

        def interpreted(*args, **kwargs):
            with _INTERPRETER:  # the interpreter patches triton.language process-wide while a kernel runs
                return launch(*args, **kwargs)

        return interpreted


_INTERPRETER = threading.Lock()

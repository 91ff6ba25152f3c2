"""The verification harness: every packed tensor is dequantized again, from its packed form, and compared with
the weights the method produced before the writer may put it on disk.

Modes: ``kernel`` runs the layout's Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1); ``reference`` runs
the plain-torch dequantizer; ``auto`` picks the kernel on CUDA and the reference elsewhere; ``off`` skips.
A mismatch raises VerificationError naming the tensor, which aborts the write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from qconv.errors import VerificationError
from qconv.kernels import (
    awq,
    bnb4,
    ct_int,
    fp8,
    ggml,
    gptq,
    hqq,
    mx,
    triton_awq,
    triton_bnb4,
    triton_fp8,
    triton_gptq,
    triton_hqq,
    triton_mx,
)
from qconv.kernels._triton import HAVE_TRITON, kernel_device_ok

MODES = ("auto", "kernel", "reference", "off")


# layout name → (reference dequantizer, Triton dequantizer); both take the layout's packed tensors as keywords
# and return float32 weights.
def _ggml_reference(raw: torch.Tensor, ggml_type: int, shape: tuple[int, ...]) -> torch.Tensor:
    from qconv.formats.ggml_blocks import dequantize

    n = 1
    for d in shape:
        n *= d
    return dequantize(raw, ggml_type, n).reshape(shape)


LAYOUTS: dict[str, tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor] | None]] = {
    "ct-int": (ct_int.dequant_reference, ct_int.dequant_triton),
    "ggml": (_ggml_reference, ggml.dequant_triton),
    "gptq": (gptq.dequant_reference, triton_gptq.dequant_triton),
    "awq": (awq.dequant_reference, triton_awq.dequant_triton),
    "hqq": (hqq.dequant_reference, triton_hqq.dequant_triton),
    "ct-fp4": (mx.ct_fp4_reference, triton_mx.ct_fp4_triton),
    "gptoss-mxfp4": (mx.gptoss_reference, triton_mx.gptoss_triton),
    "bnb4": (bnb4.dequant_reference, triton_bnb4.dequant_triton),
    "fp8": (fp8.dequant_reference, triton_fp8.dequant_triton),
}


_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal (NaN unequal to itself, ±0 equal); numpy's on CPU, which is several times faster there."""
    if a.device.type == b.device.type == "cpu" and a.dtype == b.dtype and a.dtype in _NUMPY_FLOATS:
        return bool(np.array_equal(a.detach().numpy(), b.detach().numpy()))
    return torch.equal(a, b)


@dataclass
class Verifier:
    mode: str = "auto"
    seconds: float = 0.0
    checked: int = 0
    paths: set[str] = field(default_factory=set)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"verify mode must be one of {MODES}")

    def dequantize(self, layout: str, device: torch.device | str = "cpu", **packed) -> tuple[torch.Tensor, str]:
        ref, kern = LAYOUTS[layout]
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
        probe = next(v for v in moved.values() if isinstance(v, torch.Tensor))
        use_kernel = self.mode == "kernel" or (self.mode == "auto" and probe.is_cuda and HAVE_TRITON and kern)
        if use_kernel:
            if kern is None:
                raise RuntimeError(f"--verify kernel: no Triton kernel for the {layout!r} layout yet; use auto")
            if not kernel_device_ok(probe):
                raise RuntimeError(
                    "--verify kernel needs triton and a CUDA device, or TRITON_INTERPRET=1 to run kernels on CPU"
                )
            return kern(**moved), "kernel"
        return ref(**moved), "reference"

    def check(self, name: str, layout: str, expected: torch.Tensor, count: bool = True, **packed) -> None:
        """Dequantize ``packed`` (layout ``layout``) and require bitwise equality with ``expected`` (float32).
        ``count``: False for all but the last row chunk of a tensor checked in pieces (counted once)."""
        if self.mode == "off":
            return
        t0 = time.perf_counter()
        got, path = self.dequantize(layout, device=expected.device, **packed)
        exp = expected.float()
        if got.shape != exp.shape or not _equal(got, exp):
            if got.shape != exp.shape:
                detail = f"shape {tuple(got.shape)} vs {tuple(exp.shape)}"
            else:
                diff = (got - exp).abs()
                detail = f"{int((diff > 0).sum())} elements differ, max |Δ| = {float(diff.max()):.3g}"
            raise VerificationError(
                f"{name}: packed {layout} layout does not dequantize to the method's weights ({detail})"
            )
        self.seconds += time.perf_counter() - t0
        self.checked += int(count)
        self.paths.add(path)

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "paths": sorted(self.paths),
            "tensors": self.checked,
            "seconds": round(self.seconds, 3),
        }

"""The verification harness: every packed tensor is dequantized again, from its packed form, and compared with
the weights the method produced before the writer may put it on disk.

Modes: ``kernel`` runs the layout's Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1); ``reference`` runs
the plain-torch dequantizer; ``auto`` picks the kernel on CUDA and the reference elsewhere; ``off`` skips.
A mismatch raises VerificationError naming the tensor, which aborts the write.
"""

from __future__ import annotations

import threading
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


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of two tensors of one dtype and shape (NaN payloads and signed zeros included)."""
    a8, b8 = _bytes(a), _bytes(b)
    if a.device.type == b.device.type == "cpu":
        return bool(np.array_equal(a8.numpy(), b8.numpy()))
    return torch.equal(a8, b8)


@dataclass
class Verifier:
    mode: str = "auto"
    seconds: float = 0.0
    checked: int = 0
    paths: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"verify mode must be one of {MODES}")

    def _uses_kernel(self, layout: str, probe: torch.Tensor) -> bool:
        kern = LAYOUTS[layout][1]
        return self.mode == "kernel" or bool(self.mode == "auto" and probe.is_cuda and HAVE_TRITON and kern)

    def dequantize(self, layout: str, device: torch.device | str = "cpu", **packed) -> tuple[torch.Tensor, str]:
        ref, kern = LAYOUTS[layout]
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in packed.items()}
        probe = next(v for v in moved.values() if isinstance(v, torch.Tensor))
        if self._uses_kernel(layout, probe):
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
        self._record(t0, count, path)

    def _record(self, t0: float, count: bool, path: str) -> None:
        with self._lock:  # pieces of one tensor may be checked from several threads (qconv.quant.chunks)
            self.seconds += time.perf_counter() - t0
            self.checked += int(count)
            self.paths.add(path)

    def check_ggml(self, name: str, fields, raw: torch.Tensor, shape: tuple[int, int], count: bool = True) -> None:
        """Verify GGML bytes ``raw`` (uint8, packed from ``fields``, a ``ggml_blocks.<T>Fields`` of ``shape``'s
        blocks) as ``check`` does with the method's weights ``dequantize_blocks(fields)``.

        On the kernel path exactly that. On the reference path the bytes are unpacked and every field compared with
        the method's, bit for bit: the reference dequantization of the bytes is the same function of the same
        fields as the method's dequantized weights, so the two agree exactly when the unpacked fields do (or
        differ only where different fields happen to decode alike, which this stricter check also refuses) — at
        a fraction of the cost (no float32 weights formed on either side; on a 2-core CPU the two dequantizations
        were a third of a Q4_0 conversion's work).
        """
        from qconv.formats.ggml_blocks import TYPE_SIZE, dequantize_blocks, unpack

        if self.mode == "off":
            return
        t = fields.ggml_type
        if self._uses_kernel("ggml", raw):
            expected = dequantize_blocks(fields).reshape(shape)
            self.check(name, "ggml", expected, count=count, raw=raw, ggml_type=int(t), shape=shape)
            return
        t0 = time.perf_counter()
        got = unpack(raw.reshape(-1, TYPE_SIZE[t]), t)
        for key, want in vars(fields).items():
            have = getattr(got, key)
            if not isinstance(want, torch.Tensor):
                continue
            if have.shape != want.shape or have.dtype != want.dtype:
                detail = f"{have.dtype} {list(have.shape)} vs {want.dtype} {list(want.shape)}"
            elif not _same_bits(have, want):
                detail = f"{int((_bytes(have) != _bytes(want)).sum())} bytes differ"
            else:
                continue
            raise VerificationError(
                f"{name}: packed ggml layout does not unpack to the method's {t.name} field {key} ({detail})"
            )
        self._record(t0, count, "reference")

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "paths": sorted(self.paths),
            "tensors": self.checked,
            "seconds": round(self.seconds, 3),
        }

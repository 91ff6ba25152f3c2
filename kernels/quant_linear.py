"""``QuantLinear``: a linear layer holding 4-bit packed weights that runs the fused W4A16 kernel (CUDA, or CPU
under TRITON_INTERPRET=1) and falls back to a plain-torch dequantize + matmul elsewhere.

Built from an on-disk layout through a converter of kernels/w4a16.py (compressed-tensors pack-quantized int4:
``QuantLinear.from_ct``); the packed tensors are buffers, so ``.to(device)`` moves them.
"""

from __future__ import annotations

import torch
from torch import nn

from qconv.kernels import w4a16
from qconv.kernels.w4a16 import W4Layout

MODES = ("auto", "kernel", "reference")


class QuantLinear(nn.Module):
    """y = x @ dequant(W)ᵀ + b for W [out_features, in_features] stored as a W4Layout.

    mode: ``auto`` runs the kernel where it can (CUDA tensor, float16/bfloat16 activations, triton installed;
    or under TRITON_INTERPRET=1) and the torch reference otherwise; ``kernel`` requires the kernel (raises where
    it cannot run); ``reference`` always dequantizes in torch (float32 products, one rounding to x's dtype).
    """

    def __init__(self, layout: W4Layout, bias: torch.Tensor | None = None, mode: str = "auto"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"QuantLinear mode must be one of {MODES}")
        self.out_features, self.in_features = layout.shape
        self.group_size = layout.group_size
        self.mode = mode
        self.register_buffer("qweight", layout.qweight)
        self.register_buffer("scales", layout.scales)
        self.register_buffer("zeros", layout.zeros)
        self.register_buffer("perm", layout.perm)
        self.register_buffer("g_idx", layout.g_idx)
        self.register_buffer("bias", bias)
        self.kernel_calls = 0  # how many forwards ran the Triton kernel (verify reports it)

    @classmethod
    def from_ct(
        cls, tensors: dict[str, torch.Tensor], group_size: int | None, bias: torch.Tensor | None = None, **kw
    ) -> QuantLinear:
        """From one linear's compressed-tensors tensors (suffix → tensor: weight_packed, weight_scale,
        weight_shape, optional weight_zero_point and weight_g_idx); group_size None or −1 = per channel."""
        from qconv.formats.compressed_tensors import ct_kernel_args

        args = ct_kernel_args(tensors, 4, -1 if group_size is None else group_size)
        args.pop("bits")
        return cls(w4a16.from_ct(**args), bias, **kw)

    @property
    def layout(self) -> W4Layout:
        return W4Layout(self.qweight, self.scales, self.zeros, self.group_size,
                        (self.out_features, self.in_features), self.perm, self.g_idx)  # fmt: skip

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out, in]."""
        return w4a16.dequantize(self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        why_not = w4a16.supported(x, layout) if self.mode != "reference" else "reference mode"
        if why_not is None:
            self.kernel_calls += 1
            return w4a16.w4a16_matmul(x, layout, self.bias)
        if self.mode == "kernel":
            raise RuntimeError(f"QuantLinear: the W4A16 kernel cannot run: {why_not}")
        return w4a16.reference_matmul(x, layout, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"asym={self.zeros is not None}, act_order={self.perm is not None or self.g_idx is not None}, "
                f"mode={self.mode}")  # fmt: skip

"""Triton dequantization of bitsandbytes 4-bit weights (NF4 / FP4, plain or double-quantized absmax), beside the
torch reference in ``qconv.kernels.bnb4`` and with its keyword signature:

  packed uint8 [ceil(n/2), 1], absmax float32 [nb] (or uint8 [nb] codes with the nested tensors), quant_map float32
  [16], shape, blocksize, nested_absmax float32 [ceil(nb/nested_blocksize)], nested_quant_map float32 [256],
  nested_offset, nested_blocksize  →  float32 ``shape``.

One program dequantizes BLOCK flat elements: code i is the high nibble of byte i // 2 when i is even, the low one
when odd; w = quant_map[code] · absmax'[i // blocksize] with, when double-quantized,
absmax'[j] = nested_quant_map[absmax[j]] · nested_absmax[j // nested_blocksize] + nested_offset — each step one
float32 rounding (the launch disables FMA contraction), exactly the reference's order.
"""

from __future__ import annotations

import math

import torch

from qconv.kernels._triton import HAVE_TRITON, lazy_jit, tl, triton

if HAVE_TRITON:

    @lazy_jit
    def _bnb4_dequant_kernel(
        packed_ptr, absmax_ptr, qmap_ptr, nested_ptr, nmap_ptr, out_ptr,
        n, blocksize, nested_blocksize, nested_offset,
        NESTED: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        byte = tl.load(packed_ptr + i // 2, mask=m, other=0).to(tl.int32)
        code = tl.where(i % 2 == 0, byte >> 4, byte & 0xF)
        v = tl.load(qmap_ptr + code, mask=m, other=0.0)
        blk = i // blocksize
        if NESTED:
            q = tl.load(absmax_ptr + blk, mask=m, other=0).to(tl.int32)
            am = tl.load(nmap_ptr + q, mask=m, other=0.0) * tl.load(nested_ptr + blk // nested_blocksize, mask=m)
            am = am + nested_offset
        else:
            am = tl.load(absmax_ptr + blk, mask=m, other=0.0)
        tl.store(out_ptr + i, v * am, mask=m)


def dequant_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_offset: float | torch.Tensor | None = None,
    nested_blocksize: int = 256,
    block: int = 1024,
) -> torch.Tensor:
    """Triton kernel, same contract as ``qconv.kernels.bnb4.dequant_reference`` (CUDA, or CPU under
    TRITON_INTERPRET=1); ``block`` (a power of two) is the elements per program."""
    if not HAVE_TRITON:
        raise RuntimeError("triton is not installed (pip install 'qconv[gpu]')")
    n = math.prod(int(d) for d in shape)
    out = torch.empty(tuple(int(d) for d in shape), dtype=torch.float32, device=packed.device)
    if n == 0:
        return out
    nested = nested_absmax is not None
    if nested:
        if nested_quant_map is None:
            from qconv.quant.nf4 import dynamic_map

            nested_quant_map = dynamic_map()
        nested_absmax = nested_absmax.float().contiguous()
        nmap = nested_quant_map.float().to(packed.device).contiguous()
        # a float32 scalar, as the reference adds it (a Python float would be rounded the same way)
        offset = float(torch.as_tensor(nested_offset if nested_offset is not None else 0.0).float())
        absmax = absmax.contiguous()
    else:
        absmax = absmax.float().contiguous()
        nested_absmax = nmap = absmax  # unused pointer slots
        offset = 0.0
    _bnb4_dequant_kernel[(triton.cdiv(n, block),)](
        packed.contiguous().reshape(-1), absmax, quant_map.float().to(packed.device).contiguous(), nested_absmax,
        nmap, out, n, blocksize, nested_blocksize, offset,
        NESTED=nested, BLOCK=block, enable_fp_fusion=False,
    )  # fmt: skip
    return out

"""Cheap NaN/Inf detection for large weight tensors.

``torch.isfinite`` writes a bool per element and is then reduced: three memory passes, several seconds per GB on a
2-core CPU. A float32 sum is one pass with no temporary, and is finite whenever every element is (sums of finite
weights stay far below float32's range); only when it is not is the exact count taken.
"""

from __future__ import annotations

import torch

from qconv.quant.chunks import map_chunks

_STEP = 1 << 20  # elements per slice: a few MB, so that the cores share a tensor evenly; fp8 upcasts stay small


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf elements of a float tensor (any float dtype, float8 included; 0 for non-float tensors)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    flat = t.reshape(-1)

    def count(k: int) -> int:
        s = flat[k : k + _STEP]
        if s.element_size() == 1:  # float8 has no reduction kernels; every fp8 value is exact in float32
            s = s.float()
        if bool(torch.isfinite(s.sum(dtype=torch.float32))):
            return 0
        return int((~torch.isfinite(s)).sum())  # a NaN/Inf, or finite values whose sum overflowed

    return sum(map_chunks(count, range(0, flat.numel(), _STEP), flat.device))

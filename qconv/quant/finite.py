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
    return count_nonfinite_many([t])[0]


def count_nonfinite_many(tensors: list[torch.Tensor]) -> list[int]:
    """``count_nonfinite`` of each tensor, all slices of all of them in one ``map_chunks`` (a decoder layer's
    tensors scanned as one job: per tensor, the cores waited at every tensor's last slice)."""
    flats = [t.reshape(-1) for t in tensors]
    work = [(i, k) for i, f in enumerate(flats) if f.is_floating_point() for k in range(0, f.numel(), _STEP)]

    def count(job: tuple[int, int]) -> int:
        i, k = job
        s = flats[i][k : k + _STEP]
        if s.element_size() == 1:  # float8 has no reduction kernels; every fp8 value is exact in float32
            s = s.float()
        if bool(torch.isfinite(s.sum(dtype=torch.float32))):
            return 0
        return int((~torch.isfinite(s)).sum())  # a NaN/Inf, or finite values whose sum overflowed

    out = [0] * len(flats)
    if not work:
        return out
    device = flats[work[0][0]].device
    for bad, (i, _) in zip(map_chunks(count, work, device), work):  # the generator first: zip runs it to its end
        out[i] += bad
    return out

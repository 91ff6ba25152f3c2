"""Per-linear input statistics, accumulated by forward hooks while calibration data flows through a layer.

Nothing stores activations: each batch updates running sums (mean |x|, mean x², and XᵀX when asked) and is
dropped — except a bounded sample of input rows (``sample``: every SAMPLE_STRIDE-th token, at most SAMPLE_ROWS
rows) for methods that search on real outputs (AWQ). Sums are float32 on the compute device; XᵀX uses float32
too (GPTQ's Hessian tolerates it, and a float64 [in, in] matrix for a 28672-wide down_proj would be 6.6 GB).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

KINDS = ("abs_mean", "sq_mean", "xtx", "sample", "abs_max")
SAMPLE_ROWS = 4096
SAMPLE_STRIDE = 8


@dataclass
class LinearStats:
    """Running input statistics of one linear with ``in_features`` inputs.

    count: tokens seen. abs_sum / sq_sum: float32 [in]. xtx: float32 [in, in] or None.
    """

    in_features: int
    kinds: frozenset[str]
    count: int = 0
    abs_sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None  # float32 [in]: largest |x| per input column (static activation scales)
    extra: dict = field(default_factory=dict)

    def update(self, x: torch.Tensor) -> None:
        # hooks run inside the layer's forward: under autocast, x.T @ x would come back in bf16
        with torch.autocast(x.device.type, enabled=False):
            self._update(x)

    def _update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        if "abs_mean" in self.kinds:
            s = x.abs().sum(0)
            self.abs_sum = s if self.abs_sum is None else self.abs_sum.add_(s)
        if "sq_mean" in self.kinds:
            s = x.square().sum(0)
            self.sq_sum = s if self.sq_sum is None else self.sq_sum.add_(s)
        if "abs_max" in self.kinds:
            m = x.abs().amax(0)
            self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        if "xtx" in self.kinds:
            # accumulate in place: no second [in, in] temporary per batch
            self.xtx = x.T @ x if self.xtx is None else self.xtx.addmm_(x.T, x)
        if "sample" in self.kinds:
            rows = self.extra.setdefault("sample", [])
            have = sum(r.shape[0] for r in rows)
            if have < SAMPLE_ROWS:
                rows.append(x[::SAMPLE_STRIDE][: SAMPLE_ROWS - have].clone())

    @property
    def sample(self) -> torch.Tensor:
        """float32 [≤ SAMPLE_ROWS, in]: input rows spread over the calibration tokens."""
        rows = self.extra.get("sample")
        assert rows, "sample was not collected"
        return torch.cat(rows)

    @property
    def abs_mean(self) -> torch.Tensor:
        assert self.abs_sum is not None, "abs_mean was not collected"
        return self.abs_sum / max(self.count, 1)

    @property
    def sq_mean(self) -> torch.Tensor:
        assert self.sq_sum is not None, "sq_mean was not collected"
        return self.sq_sum / max(self.count, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """XᵀX / n (float32 [in, in])."""
        assert self.xtx is not None, "xtx was not collected"
        return self.xtx / max(self.count, 1)


class StopForward(Exception):
    """Raised by a collector's hook (``stop_early``) once every wanted linear has seen the current batch: the rest of
    the layer's forward pass computes nothing the statistics need (``LayerRunner.run(keep=False)`` catches it)."""


class StatsCollector:
    """Context manager: hooks the named linears of a module and accumulates their input statistics.

    >>> with StatsCollector(layer, {"mlp.down_proj": {"xtx"}}) as stats:
    ...     runner.run(layer, i, hidden, batch)
    >>> stats["mlp.down_proj"].hessian
    """

    def __init__(self, module: nn.Module, wanted: dict[str, Iterable[str]], stop_early: bool = False):
        self.module = module
        # GPTQ's true-sequential steps ask for q/k/v's inputs (the input norm's output), then o's, then gate/up's:
        # stopping each pass at its last wanted linear skips most of the layer's compute.
        self.stop_early = stop_early
        self._seen: set[str] = set()
        self.wanted = {name: frozenset(kinds) for name, kinds in wanted.items()}
        for kinds in self.wanted.values():
            unknown = kinds - set(KINDS)
            if unknown:
                raise ValueError(f"unknown statistics {sorted(unknown)}")
        self.stats: dict[str, LinearStats] = {}
        self._handles: list = []

    def __enter__(self) -> dict[str, LinearStats]:
        if self.stop_early:  # each call of the module is one batch: nothing seen yet
            self._handles.append(self.module.register_forward_pre_hook(lambda _m, _a: self._seen.clear()))
        for name, kinds in self.wanted.items():
            lin = self.module.get_submodule(name)
            st = LinearStats(lin.in_features, kinds)
            self.stats[name] = st
            self._handles.append(lin.register_forward_pre_hook(self._hook(name, st)))
        return self.stats

    def _hook(self, name: str, st: LinearStats):
        def hook(_m, args):
            st.update(args[0])
            if self.stop_early:
                self._seen.add(name)
                if len(self._seen) == len(self.wanted):
                    raise StopForward

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

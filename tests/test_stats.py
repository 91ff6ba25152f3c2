"""qconv.stats: statistics collected by hooks, and the early stop of a pass once every wanted linear has its input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qconv.stats import StatsCollector, StopForward


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = (nn.Linear(8, 8) for _ in range(3))
        for lin in (self.a, self.b, self.c):
            lin.weight.data = torch.randn(8, 8, generator=g)
            lin.bias.data = torch.randn(8, generator=g)
        self.c_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        self.c_calls += 1
        return self.c(y)


def _run(m: Toy, batches: list[torch.Tensor], stop_early: bool) -> dict:
    with (
        torch.no_grad(),
        StatsCollector(m, {"a": {"sq_mean", "xtx"}, "b": {"abs_mean"}}, stop_early=stop_early) as stats,
    ):
        for x in batches:
            try:
                m(x)
            except StopForward:
                assert stop_early
    return stats


def test_stop_early_same_statistics_less_compute() -> None:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 5, 8, generator=g) for _ in range(4)]
    full, short = Toy(), Toy()
    ref, got = _run(full, batches, False), _run(short, batches, True)
    assert full.c_calls == 4 and short.c_calls == 0  # every pass stopped right after b, the last wanted linear
    for name in ("a", "b"):
        assert ref[name].count == got[name].count == 60
    assert torch.equal(ref["a"].sq_mean, got["a"].sq_mean) and torch.equal(ref["a"].hessian, got["a"].hessian)
    assert torch.equal(ref["b"].abs_mean, got["b"].abs_mean)


def test_stop_early_waits_for_every_wanted_linear_within_one_batch() -> None:
    """A linear that a batch never reaches (an unrouted expert) must not let a later batch stop before the others
    have seen it: what was seen is forgotten at each call of the module."""

    class Skip(Toy):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            if x.shape[0] == 1:  # this batch never reaches b
                self.c_calls += 1
                return self.c(h)
            return self.b(h)

    m = Skip()
    g = torch.Generator().manual_seed(2)
    stats = _run(m, [torch.randn(1, 2, 8, generator=g), torch.randn(2, 2, 8, generator=g)], True)
    assert m.c_calls == 1  # the first batch ran to the end: b was never seen in it
    assert stats["a"].count == 2 + 4 and stats["b"].count == 4


def test_unknown_statistic_rejected() -> None:
    with pytest.raises(ValueError, match="unknown"):
        StatsCollector(Toy(), {"a": {"median"}})

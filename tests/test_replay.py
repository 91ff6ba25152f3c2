"""Sub-block replay across a layer's calibration passes (qconv.replay): same bytes as recomputing, fewer attention
runs, and a memo dropped whenever anything upstream of its linear changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qconv.pipeline import QuantizeConfig, RunOptions, quantize
from qconv.replay import ReplayCache

from conftest import tiny_model


class _Attn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        return self.o(torch.tanh(self.a(x))), None


class _MoE(nn.Module):  # output is not one linear's: never replayed
    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, d)
        self.down = nn.Linear(d, d)

    def forward(self, x):
        return self.down(self.up(x)) * 0.5


class _Layer(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = _Attn(d)
        self.mlp = _MoE(d)

    def forward(self, x):
        h = x + self.attn(self.norm(x))[0]
        return h + self.mlp(h)


def _run(layer, xs):
    with torch.no_grad():
        return [layer(x) for x in xs]


def _cache(layer, xs, budget=1 << 30):
    return ReplayCache(layer, ["attn.a", "attn.o", "mlp.up", "mlp.down"], sum(x.shape[0] for x in xs), 4, budget,
                       lambda: _run(layer, xs[:1]))  # fmt: skip


def test_replay_skips_the_finished_block_and_tracks_changes():
    torch.manual_seed(0)
    layer, xs = _Layer(), [torch.randn(5, 16) for _ in range(3)]
    cache = _cache(layer, xs)
    calls = []
    counter = layer.attn.a.register_forward_pre_hook(lambda *_: calls.append(1))
    with cache.pass_():
        _run(layer, xs)
    assert [m.module for m in cache.memos] == ["attn"]  # _MoE's output is not its down's: not a candidate
    # the memo's linear changes (as GPTQ quantizes it): replayed, and equal to a full recomputation
    layer.attn.o.weight.data = layer.attn.o.weight.data.round()
    calls.clear()
    with cache.pass_():
        got = _run(layer, xs)
    assert not calls
    counter.remove()
    ref = _run(layer, xs)
    assert all(torch.equal(g, r) for g, r in zip(got, ref, strict=True))
    # statistics wanted inside the block: it runs in full, the memo stays
    layer.attn.a.register_forward_pre_hook(lambda *_: calls.append(1))
    with cache.pass_({"attn.a"}):
        _run(layer, xs)
    assert len(calls) == len(xs) and cache.memos[0].inputs is not None
    # upstream changes in place (a .data write the autograd version counter does not see): the memo is dropped
    for change in (lambda: layer.attn.a.weight.data.mul_(1.5), lambda: layer.norm.bias.data.add_(0.1)):
        change()
        calls.clear()
        with cache.pass_():
            got = _run(layer, xs)
        assert len(calls) == len(xs)  # recomputed (and captured again)
        with cache.pass_():
            again = _run(layer, xs)
        assert len(calls) == len(xs)  # the fresh memo replays
        assert all(torch.equal(g, r) for g, r in zip(got, again, strict=True))


def test_replay_respects_the_budget_and_partial_passes():
    torch.manual_seed(0)
    layer, xs = _Layer(), [torch.randn(5, 16) for _ in range(3)]
    cache = _cache(layer, xs, budget=100)  # less than the kept inputs need
    with cache.pass_():
        _run(layer, xs)
    assert cache.memos[0].inputs is None
    cache = _cache(layer, xs)
    with cache.pass_():  # a pass cut short before the linear (as a collector's StopForward does): nothing kept
        _run(layer, xs[:2])
        layer.attn.a.register_forward_pre_hook(_stop)
        with pytest.raises(RuntimeError):
            _run(layer, xs[2:])
    assert cache.memos[0].inputs is None


def _stop(*_):
    raise RuntimeError("stop")


@pytest.mark.parametrize(
    "method,extra",
    [("gptq", {"act_order": True}), ("awq+gptq", {}), ("fp8", {"opts": {"fp8_gptq": "true"}})],
)
def test_replay_gives_the_same_bytes_with_fewer_attention_runs(tokenizer_files, tmp_path, monkeypatch, method, extra):
    model = tiny_model(tmp_path, "llama", tokenizer_files, num_hidden_layers=3)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    runs = []

    def counting(*a, **k):
        runs.append(1)
        return sdpa(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    opts = extra.pop("opts", {})
    cfg = QuantizeConfig(method=method, bits=4 if method != "fp8" else 8, group_size=32, calib_samples=6,
                         calib_seqlen=32, method_options=extra, opts=opts)  # fmt: skip
    outs, counts = {}, {}
    for replay in (False, True):
        runs.clear()
        outs[replay] = tmp_path / f"out-{replay}"
        quantize(str(model), outs[replay], cfg, RunOptions(batch_size=2, replay=replay, checkpoint=False))
        counts[replay] = len(runs)
    assert (outs[True] / "model.safetensors").read_bytes() == (outs[False] / "model.safetensors").read_bytes()
    # GPTQ: attention in the o, gate/up, down and output passes (4 runs per batch) → in the o pass (+ a probe)
    assert counts[True] < counts[False] / 1.9, counts

"""Replay finished sub-blocks of a decoder layer across its calibration passes.

GPTQ's true-sequential steps run the calibration set through one layer five times (to collect the inputs of q/k/v,
of o, of gate/up, of down, then the layer's output). Once q/k/v are final, the attention block's output is
``o_proj(a)`` with ``a`` fixed; once gate/up are final too, the MLP's output is ``down_proj(m)`` with ``m`` fixed.
Keeping ``a`` (and ``m``) per micro-batch from the pass that first reaches them turns the later passes' attention
(the slowest part on a CPU) and MLP into one matmul each, with bit-identical results: the replayed linear sees the
very tensor it would have been given.

Which sub-blocks qualify is checked, not assumed: a one-sample probe confirms that the module's output *is* its
last linear's output (a tuple's other entries None) and records the order in which the layer's modules run. A kept
input stays valid while every parameter and buffer that runs before the linear is unchanged; each pass compares
them with a snapshot taken at capture (exact equality), so a method changing weights in place, by ``.data`` or
through AWQ's folded scales invalidates the memo rather than replaying stale activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Memo:
    """One replayable sub-block: ``module`` (a child of the layer, e.g. "self_attn") whose output is ``last``'s
    (e.g. "self_attn.o_proj") output. ``inputs``: ``last``'s input per micro-batch; ``deps``: (live tensor, snapshot)
    of everything that runs before ``last``."""

    module: str
    last: str
    nbytes: int
    arity: int = 0  # 0: the module returns a tensor; n: a tuple of n whose first entry is the output
    inputs: list[torch.Tensor] | None = None
    deps: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def valid(self) -> bool:
        return self.inputs is not None and all(
            live.shape == snap.shape and torch.equal(live, snap) for live, snap in self.deps
        )

    @property
    def cost(self) -> int:
        """Bytes held: the kept inputs (as budgeted) and the snapshots."""
        return self.nbytes + _bytes(snap for _, snap in self.deps)

    def drop(self) -> None:
        self.inputs, self.deps = None, []


class ReplayCache:
    """Per-layer memo of sub-block inputs, used around each calibration pass (``with cache.pass_(wanted): run()``).

    layer: the decoder layer; linears: its quantizable linears in execution order (the last one inside each direct
    child is that child's candidate); tokens: calibration tokens per pass (N·T); itemsize: bytes per activation
    element; budget: bytes the kept inputs and snapshots may take; probe: runs one calibration sample through the
    layer (structure check).
    """

    def __init__(
        self,
        layer: nn.Module,
        linears: Iterable[str],
        tokens: int,
        itemsize: int,
        budget: int,
        probe: Callable[[], None],
    ):
        self.layer = layer
        self.budget = budget
        self._probe = probe
        self._probed = False
        last: dict[str, str] = {}
        for name in linears:
            if "." in name:
                last[name.split(".", 1)[0]] = name
        self.memos = [
            _Memo(child, lin, tokens * layer.get_submodule(lin).in_features * itemsize) for child, lin in last.items()
        ]
        self._order: list[str] = []  # module names in the order they first ran during the probe
        self._batch = -1

    # -- structure ----------------------------------------------------------------------------------------------

    def _run_probe(self) -> None:
        """One sample through the layer: which candidates return their last linear's output, and the run order."""
        self._probed = True
        if not self.memos:
            return
        outs: dict[str, object] = {}
        seen: dict[str, torch.Tensor] = {}
        handles = []
        for name, mod in self.layer.named_modules():
            handles.append(mod.register_forward_pre_hook(lambda _m, _a, n=name: self._order.append(n)))
        for m in self.memos:
            handles.append(self.layer.get_submodule(m.last).register_forward_hook(
                lambda _m, _a, out, n=m.last: seen.__setitem__(n, out)))  # fmt: skip
            handles.append(self.layer.get_submodule(m.module).register_forward_hook(
                lambda _m, _a, out, n=m.module: outs.__setitem__(n, out)))  # fmt: skip
        try:
            self._probe()
        finally:
            for h in handles:
                h.remove()
        order = list(dict.fromkeys(self._order))
        self._order = order
        kept = []
        for m in self.memos:
            out, last = outs.get(m.module), seen.get(m.last)
            if last is None or out is None:
                continue
            if out is last:
                m.arity = 0
            elif isinstance(out, tuple) and out and out[0] is last and all(x is None for x in out[1:]):
                m.arity = len(out)
            else:
                continue  # e.g. a mixture-of-experts block: its output is not one linear's
            kept.append(m)
        self.memos = kept

    def _deps(self, m: _Memo) -> list[torch.Tensor]:
        """Parameters and buffers of every module that runs before ``m.last`` (modules that never ran count too)."""
        pos = self._order.index(m.last)
        after = set(self._order[pos:])  # ``last`` itself and what runs after it
        out = []
        for full, t in [*self.layer.named_parameters(), *self.layer.named_buffers()]:
            owner = full.rsplit(".", 1)[0] if "." in full else ""
            if owner not in after:
                out.append(t)
        return out

    # -- passes ---------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def pass_(self, wanted: Iterable[str] = ()) -> Iterator[None]:
        """Around one calibration pass over all micro-batches (in the same order every pass). ``wanted``: linears
        whose statistics the pass collects; a sub-block holding one of them (other than its last) runs in full."""
        if not self._probed:
            self._run_probe()
        wanted = set(wanted)
        handles, patched, captures = [], [], {}
        self._batch = -1
        handles.append(self.layer.register_forward_pre_hook(self._next_batch))
        for m in self.memos:
            if m.inputs is not None and not m.valid():
                m.drop()
        used = sum(m.cost for m in self.memos if m.inputs is not None)
        for m in self.memos:
            inside = {w for w in wanted if w.startswith(m.module + ".") and w != m.last}
            if m.inputs is not None:
                if not inside:
                    mod = self.layer.get_submodule(m.module)
                    mod.forward = self._replayer(m)
                    patched.append(mod)
                continue
            deps = self._deps(m)
            cost = m.nbytes + _bytes(deps)
            if used + cost > self.budget:
                continue
            used += cost
            got: list[torch.Tensor] = []
            captures[m.last] = (m, got, deps)
            handles.append(self.layer.get_submodule(m.last).register_forward_pre_hook(self._capturer(got)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for mod in patched:
                del mod.forward
        calls = self._batch + 1
        for m, got, deps in captures.values():
            if calls and len(got) == calls:  # every micro-batch reached the linear
                m.inputs = got
                m.deps = [(t, t.detach().clone()) for t in deps]

    def _next_batch(self, _m, _a) -> None:
        self._batch += 1

    def _capturer(self, got: list[torch.Tensor]):
        def hook(_m, args):
            if len(got) == self._batch:  # the first call of this micro-batch
                got.append(args[0].detach())

        return hook

    def _replayer(self, m: _Memo):
        lin = self.layer.get_submodule(m.last)

        def forward(*_args, **_kwargs):
            y = lin(m.inputs[self._batch])
            return y if m.arity == 0 else (y, *([None] * (m.arity - 1)))

        return forward


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)

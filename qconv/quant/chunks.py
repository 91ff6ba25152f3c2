"""Running independent work chunks side by side on the CPU.

qconv's per-chunk work (block fitting, packing, verification) is a long series of elementwise torch ops on ~2 MB
tensors. torch parallelises each op on its own, and on a few MB its fork/join per op costs about as much as the op:
on a 2-core machine a Q6_K fit ran 1.0–1.1× faster with two torch threads than with one. Giving each core whole
chunks instead (Python threads, torch at one thread; the ops release the GIL) makes the cores' work independent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_active = 0  # map_chunks calls running (torch's thread count is process-wide: the outermost one sets it back)
_saved = 1


@contextmanager
def _torch_single_threaded() -> Iterator[None]:
    global _active, _saved
    with _lock:
        if _active == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                torch.set_num_threads(_saved)


def workers_for(device: torch.device | str) -> int:
    """How many chunks run at once on ``device``: torch's thread count on a CPU (inside a running ``map_chunks``,
    1: its workers already hold every core), 1 on an accelerator (one stream of kernels)."""
    if torch.device(device).type != "cpu":
        return 1
    with _lock:
        return 1 if _active else torch.get_num_threads()


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    """One pool per worker count for the process (starting threads for each tensor cost ~1 ms a call)."""
    with _lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="qconv-chunk")
        return _pools[n]


def map_chunks(fn: Callable[[T], R], items: Iterable[T], device: torch.device | str) -> Iterator[R]:
    """``fn(item)`` for every item, results in order (lazily: a result is yielded once it and those before it are
    done, at most ``2 · workers`` items ahead of the consumer, so memory stays bounded). On a CPU with n > 1 torch
    threads, n items run at a time in Python threads with torch at one thread each; elsewhere one after another in
    the caller's thread. ``fn`` must not share writable state between items (scratch buffers: ``thread_local``)."""
    n = workers_for(device)
    if n <= 1:
        for item in items:
            yield fn(item)
        return
    ex = _pool(n)
    with _torch_single_threaded():
        pending = []
        try:
            for item in items:
                pending.append(ex.submit(fn, item))
                if len(pending) >= 2 * n:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()


class thread_local(threading.local):  # noqa: N801 (used like a function: one value per thread)
    """Per-thread value made on first use: ``ws = thread_local(_Ws)`` then ``ws.get()`` in each worker."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory

    def get(self):
        v = self.__dict__.get("_value")
        if v is None:
            v = self._value = self._factory()
        return v


def shutdown() -> None:
    """Stop the worker threads (they are not daemons: an interpreter exit waits for them; a later ``map_chunks``
    starts new ones)."""
    for ex in list(_pools.values()):
        ex.shutdown(wait=True)
    _pools.clear()

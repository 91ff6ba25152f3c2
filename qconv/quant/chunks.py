"""Running independent work chunks side by side on the CPU.

qconv's per-chunk work (block fitting, packing, verification) is a long series of elementwise torch ops on ~2 MB
tensors. torch parallelises each op on its own, and on a few MB its fork/join per op costs about as much as the op:
on a 2-core machine a Q6_K fit ran 1.0–1.1× faster with two torch threads than with one. Giving each core whole
chunks instead (Python threads, torch at one thread; the ops release the GIL) makes the cores' work independent.

Two ways in: ``map_chunks`` (results in order, for work whose caller needs them) and ``Batch`` (fire and forget,
for work that ends in a side effect, such as a packed piece written at its offset: the caller goes on to the next
tensor while the pieces run, so the cores do not idle at every tensor's end).
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()
_leases = 0  # map_chunks calls and open Batches: while any, the caller's torch runs at one thread
_saved = 1  # torch's thread count before the first lease (what the workers stand for)
_saved_switch = 0.005  # the interpreter's GIL switch interval before the first lease
_worker = threading.local()  # .on: this thread is a pool worker


_SWITCH_INTERVAL = 0.0005  # seconds; Python's default is 0.005


def _acquire() -> None:
    """Called in the thread that owns the work (torch's thread count is per calling thread once set).

    While chunks run, the GIL changes hands every 0.5 ms instead of 5: the workers hold it for the Python between
    their torch ops, and the caller, which queues the next chunks and takes the results, waited up to a full
    interval each time while a core idled (a 1B Q4_0 conversion: 3 % faster)."""
    global _leases, _saved, _saved_switch
    with _lock:
        if _leases == 0:
            _saved = torch.get_num_threads()
            torch.set_num_threads(1)
            _saved_switch = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_switch, _SWITCH_INTERVAL))
        _leases += 1


def _release() -> None:
    global _leases
    with _lock:
        _leases -= 1
        if _leases == 0:
            torch.set_num_threads(_saved)
            sys.setswitchinterval(_saved_switch)


def workers_for(device: torch.device | str) -> int:
    """How many chunks run at once on ``device``: torch's thread count on a CPU (1 inside a worker: the workers
    already hold every core), 1 on an accelerator (one stream of kernels)."""
    if torch.device(device).type != "cpu" or getattr(_worker, "on", False):
        return 1
    with _lock:
        return _saved if _leases else torch.get_num_threads()


def _mark_worker() -> None:
    _worker.on = True


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    """One pool per worker count for the process (starting threads for each tensor cost ~1 ms a call)."""
    with _lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="qconv-chunk", initializer=_mark_worker)
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
    _acquire()
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= 2 * n:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        _release()


class Batch:
    """Chunks whose results nobody waits for in order. ``submit(fn, item, device)`` queues ``fn(item)`` on the
    workers (runs it inline where ``workers_for(device)`` is 1) and returns at once; ``wait``, or a later ``submit``
    for what has finished, raises the first error. At most ``limit`` chunks are queued: a ``submit`` beyond that
    waits for the oldest. Used from one thread (the one that ``wait``s); ``cancel`` drops what has not started and
    waits for what has."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._futures: deque[Future] = deque()
        self._leased = False

    def submit(self, fn: Callable[[T], object], item: T, device: torch.device | str) -> None:
        n = workers_for(device)
        if n <= 1:
            fn(item)
            return
        self._reap(block=len(self._futures) >= self.limit)
        if not self._leased:
            _acquire()
            self._leased = True
        self._futures.append(_pool(n).submit(fn, item))

    def _reap(self, block: bool) -> None:
        while self._futures and (block or self._futures[0].done()):
            f = self._futures.popleft()
            block = False
            f.result()  # raises the chunk's error

    def wait(self) -> None:
        """Block until every submitted chunk is done; raises the first error (the rest are still waited for)."""
        try:
            while self._futures:
                self._futures.popleft().result()
        except BaseException:
            self.cancel()
            raise
        self._unlease()

    def cancel(self) -> None:
        for f in self._futures:
            f.cancel()
        for f in self._futures:
            if not f.cancelled():
                f.exception()  # waits for it; its error, if any, is not the one being reported
        self._futures.clear()
        self._unlease()

    def _unlease(self) -> None:
        if self._leased:
            self._leased = False
            _release()


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

"""qconv.quant.chunks: chunks side by side on the CPU, results in order, torch's thread count restored."""

import sys

import pytest
import torch

from qconv.quant import chunks


def test_map_chunks_keeps_order_and_restores_threads():
    n, switch = torch.get_num_threads(), sys.getswitchinterval()
    seen = []

    def work(i: int) -> int:
        seen.append(torch.get_num_threads())
        return int(torch.full((1000,), i).sum())

    assert list(chunks.map_chunks(work, range(50), "cpu")) == [1000 * i for i in range(50)]
    assert torch.get_num_threads() == n and sys.getswitchinterval() == switch
    if n > 1:
        assert set(seen) == {1}  # each worker at one torch thread
        assert chunks.workers_for("cpu") == n


def test_map_chunks_raises_the_first_error_and_stays_usable():
    def work(i: int) -> int:
        if i == 7:
            raise ValueError("chunk 7")
        return i

    with pytest.raises(ValueError, match="chunk 7"):
        list(chunks.map_chunks(work, range(20), "cpu"))
    assert list(chunks.map_chunks(lambda i: i, range(5), "cpu")) == list(range(5))
    chunks.shutdown()
    assert list(chunks.map_chunks(lambda i: -i, range(3), "cpu")) == [0, -1, -2]


def test_nested_map_runs_inline():
    inner = list(
        chunks.map_chunks(lambda i: list(chunks.map_chunks(lambda j: (i, j), range(3), "cpu")), range(4), "cpu")
    )
    assert inner == [[(i, j) for j in range(3)] for i in range(4)]


def test_batch_runs_everything_and_reports_the_first_error():
    n = torch.get_num_threads()
    done: list[int] = []
    b = chunks.Batch(limit=3)
    for i in range(20):
        b.submit(lambda i: done.append(int(torch.full((100,), i).sum()) // 100), i, "cpu")
    if n > 1:  # the caller's torch runs at one thread while chunks are in flight
        assert torch.get_num_threads() == 1
        assert chunks.workers_for("cpu") == n  # a map_chunks meanwhile still uses the workers
        assert list(chunks.map_chunks(lambda i: i * 2, range(6), "cpu")) == [0, 2, 4, 6, 8, 10]
    b.wait()
    assert sorted(done) == list(range(20)) and torch.get_num_threads() == n

    def work(i: int) -> None:
        if i == 5:
            raise ValueError("chunk 5")

    for i in range(10):
        try:
            b.submit(work, i, "cpu")
        except ValueError:  # a later submit may already see the failure
            break
    else:
        with pytest.raises(ValueError, match="chunk 5"):
            b.wait()
    b.cancel()
    assert torch.get_num_threads() == n
    b.submit(lambda i: done.append(i), 99, "cpu")
    b.wait()
    assert done[-1] == 99


def test_batch_inside_a_worker_runs_inline():
    def outer(i: int) -> int:
        got: list[int] = []
        b = chunks.Batch()
        b.submit(got.append, i, "cpu")  # inline: nothing queued behind the caller's own worker
        assert got == [i]
        return i

    assert list(chunks.map_chunks(outer, range(4), "cpu")) == list(range(4))

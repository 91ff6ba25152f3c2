"""qconv.quant.chunks: chunks side by side on the CPU, results in order, torch's thread count restored."""

import pytest
import torch

from qconv.quant import chunks


def test_map_chunks_keeps_order_and_restores_threads():
    n = torch.get_num_threads()
    seen = []

    def work(i: int) -> int:
        seen.append(torch.get_num_threads())
        return int(torch.full((1000,), i).sum())

    assert list(chunks.map_chunks(work, range(50), "cpu")) == [1000 * i for i in range(50)]
    assert torch.get_num_threads() == n
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

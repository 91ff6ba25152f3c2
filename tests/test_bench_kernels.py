"""``qconv bench-kernels`` (qconv/bench_kernels.py): the CLI's refusals, and the table and target lines it writes
from measured rows (the timings themselves need a GPU: BENCHMARKS.md, kernels)."""

from __future__ import annotations

import pytest
import torch

from qconv import bench_kernels as bk


def test_refuses_without_a_gpu_and_on_bad_options(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = cli("bench-kernels", "--out", tmp_path / "o")
    assert r.code == 2 and "needs a CUDA GPU" in r.stderr
    assert not (tmp_path / "o").exists()
    for opt, val, msg in (("--shapes", "4096,x", "--shapes"), ("--shapes", "0,8", "not positive"),
                          ("--ms", "1,a", "--ms")):  # fmt: skip
        r = cli("bench-kernels", opt, val, "--out", tmp_path / "o")
        assert r.code == 2 and msg in r.stderr, r.stderr


def test_parse_shapes():
    assert bk.parse_shapes("all") == bk.SHAPES
    assert bk.parse_shapes("4096,14336;8,16") == [(4096, 14336), (8, 16)]


def _row(k, n, m, bf16, qconv, tg=None):
    row = {"K": k, "N": n, "M": m, "bf16_us": bf16, "qconv_us": qconv, "qconv_config": "cfg",
           "bytes": {"bf16": 2 * n * k, "qconv": n * k // 2, "tinygemm": n * k // 2}}  # fmt: skip
    if tg:
        row["tinygemm_us"] = tg
    return row


def test_table_and_targets_from_rows():
    """Ratios and the met / not met verdicts come from the rows: M=1 on 8192×28672 against tinygemm and copy
    bandwidth, M=16/128/512 against bf16 on the shapes measured."""
    rows = [_row(8192, 28672, 1, 160.0, 48.0, tg=60.0), _row(8192, 8192, 16, 48.0, 18.0), _row(4096, 4096, 16, 16.0,
            9.0), _row(8192, 8192, 512, 90.0, 95.0)]  # fmt: skip
    copy = 2.4e12
    md = bk.table(rows, copy)
    assert md.count("\n") == len(rows) + 1 and "| 8192 | 28672 | 1 | 160.0 | 60.0 | 48.0 |" in md
    lines = bk.targets(rows, copy, read_bw=2.9e12)
    assert lines[0] == "M=1, 8192×28672: 1.25× tinygemm (target ≥ 1.2: met)"
    bw = 8192 * 28672 // 2 / 48e-6 / copy
    assert lines[1] == f"M=1, 8192×28672: {100 * bw:.0f} % of copy bandwidth (target ≥ 75 %: met)"
    assert "M=16: × bf16 from 1.78 to 2.67 (target ≥ 2.5: met on 1 of 2 shapes)" in lines
    assert "M=512: × bf16 from 0.95 to 0.95 (target ≥ 0.9: met on 1 of 1 shapes)" in lines
    assert not any(line.startswith("M=128") for line in lines)


@pytest.mark.parametrize("asym", [False, True])
def test_run_refuses_before_writing(tmp_path, monkeypatch, asym):
    from qconv.errors import InputError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="CUDA"):
        bk.run(tmp_path / "o", asym=asym)
    assert not (tmp_path / "o").exists()

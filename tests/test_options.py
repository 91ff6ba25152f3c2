"""--opt KEY=VALUE: declared per method/format, converted and validated centrally."""

from __future__ import annotations

import pytest

from qconv.errors import InputError
from qconv.options import Option, parse_pairs, resolve

M = (Option("iters", int, 20, "iterations"), Option("mode", str, "a", "mode", choices=("a", "b")))
F = (Option("v2", bool, False, "write v2"),)


def test_resolve_splits_and_converts():
    m, f = resolve(parse_pairs(["iters=5", "v2=yes"]), [("--method x", M), ("--format y", F)])
    assert m == {"iters": 5, "mode": "a"} and f == {"v2": True}


@pytest.mark.parametrize(
    "pairs, needle",
    [
        (["iters=five"], "expects a int"),
        (["mode=c"], "accepts a, b"),
        (["v2=maybe"], "expects a bool"),
        (["zzz=1"], "options: iters, mode, v2"),
    ],
)
def test_resolve_errors(pairs, needle):
    with pytest.raises(InputError, match=needle):
        resolve(parse_pairs(pairs), [("--method x", M), ("--format y", F)])


def test_non_str_values_from_job_files():
    (m,) = resolve({"iters": 3}, [("--method x", M)])
    assert m["iters"] == 3

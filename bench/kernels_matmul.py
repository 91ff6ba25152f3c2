"""`make bench-kernels` without installing the console script: ``qconv bench-kernels`` (qconv/bench_kernels.py).

python bench/kernels_matmul.py [--out DIR] [--shapes all|K,N;...] [--ms 1,4,16,64,128,512] [--asym]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qconv.bench_kernels import MS, parse_shapes, run
from qconv.errors import InputError


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--shapes", default="all", help="all, or K,N;K,N;…")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--asym", action="store_true", help="also time asymmetric (uint8 zero points) weights")
    args = ap.parse_args()
    try:
        run(Path(args.out), parse_shapes(args.shapes), [int(v) for v in args.ms.split(",")], args.asym)
    except InputError as e:
        sys.exit(str(e))


if __name__ == "__main__":
    main()

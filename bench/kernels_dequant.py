"""Dequantization kernels' bandwidth: every packed layout's Triton kernel on one weight (default [4096, 14336]),
against a device-to-device copy measured in the same run.

    python bench/kernels_dequant.py --json bench-out/kernels_dequant.json        # CUDA (the H100 through `run`)
    python bench/kernels_dequant.py --smoke                                     # CPU interpreter, tiny shape

For each case: the packed tensors are random words (scales finite), built on the device; the kernel
(``qconv.kernels.verify.LAYOUTS[layout][1]``) is timed with ``triton.testing.do_bench`` (L2 flushed between
runs, median), and so is the layout's torch reference on the same device. Bandwidth counts bytes read (every packed
tensor argument) plus bytes written (the float32 output); the copy baseline copies a buffer as large as the
largest output, counting read + write. ``exact`` says whether the kernel's output equals the reference bit for bit
(CPU reference in --smoke, the device reference otherwise). Prints a markdown table; --json writes the same rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

Case = tuple[str, str, Callable[[torch.device, int, int], dict]]


def _words(shape, g, device) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64, device=device).to(torch.int32)


def _bytes(shape, g, device) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=g, dtype=torch.int64, device=device).to(torch.uint8)


def _gen(device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _scales(shape, g, device, dtype=torch.float16) -> torch.Tensor:
    return (torch.randn(shape, generator=g, device=device) * 0.01).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Packed arguments per layout: (layout, label, build(device, out, in) → keyword arguments)


def ct_int(bits: int, group: int, symmetric: bool, act_order: bool = False):
    def build(dev, out_f, in_f):
        g = _gen(dev)
        gs = in_f if group == -1 else group
        n_groups = -(-in_f // gs)
        gidx = None
        if act_order:
            gidx = (torch.arange(in_f, device=dev) // gs)[torch.randperm(in_f, generator=g, device=dev)]
        return {
            "packed": _words((out_f, -(-in_f * bits // 32)), g, dev),
            "scale": _scales((out_f, n_groups), g, dev, torch.bfloat16),
            "zero_packed": None if symmetric else _words((-(-out_f * bits // 32), n_groups), g, dev),
            "shape": (out_f, in_f),
            "bits": bits,
            "group_size": gs,
            "g_idx": None if gidx is None else gidx.to(torch.int32),
        }

    label = f"w{bits} g{group if group > 0 else 'c'} {'sym' if symmetric else 'asym'}{' g_idx' if act_order else ''}"
    return ("ct-int", label, build)


def gptq(bits: int, group: int, fmt: str = "gptq", act_order: bool = False):
    def build(dev, out_f, in_f):
        g = _gen(dev)
        n_groups = in_f // group
        gidx = torch.arange(in_f, device=dev) // group
        if act_order:
            gidx = gidx[torch.randperm(in_f, generator=g, device=dev)]
        return {
            "qweight": _words((-(-in_f * bits // 32), out_f), g, dev),
            "qzeros": _words((n_groups, -(-out_f * bits // 32)), g, dev),
            "scales": _scales((n_groups, out_f), g, dev),
            "g_idx": gidx.to(torch.int32),
            "bits": bits,
            "checkpoint_format": fmt,
        }

    return ("gptq", f"w{bits} g{group} {fmt}{' act-order' if act_order else ''}", build)


def awq(group: int):
    def build(dev, out_f, in_f):
        g = _gen(dev)
        return {
            "qweight": _words((in_f, out_f // 8), g, dev),
            "qzeros": _words((in_f // group, out_f // 8), g, dev),
            "scales": _scales((in_f // group, out_f), g, dev),
            "group_size": group,
        }

    return ("awq", f"w4 g{group}", build)


def hqq(nbits: int, group: int, axis: int, dtype=torch.bfloat16):
    def build(dev, out_f, in_f):
        from qconv.formats.hqq import packed_shape
        from qconv.kernels.hqq import grouped_shape

        g = _gen(dev)
        rows, cols = grouped_shape((out_f, in_f), group, axis)
        pshape, pdtype = packed_shape((rows, cols), nbits)
        n_groups = rows if axis == 1 else cols
        gshape = (n_groups, 1) if axis == 1 else (1, n_groups)
        return {
            "W_q": _bytes(pshape, g, dev) if pdtype == torch.uint8 else _words(pshape, g, dev) & 0x3FFFFFFF,
            "scale": _scales(gshape, g, dev, dtype),
            "zero": (torch.rand(gshape, generator=g, device=dev) * ((1 << nbits) - 1)).to(dtype),
            "shape": (out_f, in_f),
            "nbits": nbits,
            "group_size": group,
            "axis": axis,
        }

    return ("hqq", f"w{nbits} g{group} axis{axis} {str(dtype).removeprefix('torch.')}", build)


def bnb4(quant_type: str, blocksize: int, double_quant: bool):
    def build(dev, out_f, in_f):
        from qconv.formats.bnb import stored_quant_map
        from qconv.quant.nf4 import dynamic_map

        g = _gen(dev)
        n = out_f * in_f
        nb = -(-n // blocksize)
        args = {
            "packed": _bytes((-(-n // 2), 1), g, dev),
            "quant_map": stored_quant_map(quant_type).to(dev),
            "shape": (out_f, in_f),
            "blocksize": blocksize,
        }
        if double_quant:
            args |= {
                "absmax": _bytes((nb,), g, dev),
                "nested_absmax": torch.rand(-(-nb // 256), generator=g, device=dev) * 0.1,
                "nested_quant_map": dynamic_map().to(dev),
                "nested_offset": 0.03125,
                "nested_blocksize": 256,
            }
        else:
            args["absmax"] = torch.rand(nb, generator=g, device=dev) * 0.1
        return args

    return ("bnb4", f"{quant_type} b{blocksize}{' dq' if double_quant else ''}", build)


def ct_fp4(kind: str):
    def build(dev, out_f, in_f):
        g = _gen(dev)
        block = 32 if kind == "mxfp4" else 16
        args = {"packed": _bytes((out_f, in_f // 2), g, dev), "shape": (out_f, in_f), "block": block}
        if kind == "mxfp4":
            args["scale"] = torch.randint(110, 130, (out_f, in_f // block), generator=g, device=dev).to(torch.uint8)
        else:
            args["scale"] = (torch.rand(out_f, in_f // block, generator=g, device=dev) * 400).to(torch.float8_e4m3fn)
            args["global_scale"] = torch.tensor([1000.0], device=dev)
        return args

    return ("ct-fp4", kind, build)


def gptoss_mxfp4():
    def build(dev, out_f, in_f):
        g = _gen(dev)
        return {
            "blocks": _bytes((out_f, in_f // 32, 16), g, dev),
            "scales": torch.randint(110, 130, (out_f, in_f // 32), generator=g, device=dev).to(torch.uint8),
        }

    return ("gptoss-mxfp4", "bf16 out", build)


def fp8(kind: str, block: int = 128):
    def build(dev, out_f, in_f):
        g = _gen(dev)
        # clamped: a cast past ±448 gives NaN, whose payload bits the comparison would then depend on
        w = (torch.randn(out_f, in_f, generator=g, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
        if kind == "tensor":
            scale, bs = torch.rand(1, generator=g, device=dev), None
        elif kind == "channel":
            scale, bs = torch.rand(out_f, 1, generator=g, device=dev), None
        else:
            scale = torch.rand(-(-out_f // block), -(-in_f // block), generator=g, device=dev)
            bs = (block, block)
        return {"weight": w, "scale": scale, "block_size": bs}

    return ("fp8", f"e4m3 {kind}" + (f" {block}x{block}" if kind == "block" else ""), build)


# Byte offsets of the fp16 scale members in each GGML block (ggml-common.h): made finite so no NaN slows a path.
_GGML_F16 = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82), "Q3_K": (108,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,), "MXFP4": (),
}  # fmt: skip


def ggml(type_name: str):
    def build(dev, out_f, in_f):
        from qconv.formats.ggml_blocks import BLOCK_SIZE, TYPE_SIZE, GGMLType

        g = _gen(dev)
        t = GGMLType[type_name]
        nb = out_f * in_f // BLOCK_SIZE[t]
        raw = _bytes((nb, TYPE_SIZE[t]), g, dev)
        for off in _GGML_F16[type_name]:
            raw[:, off : off + 2] = _scales((nb,), g, dev).view(torch.uint8).reshape(nb, 2)
        if type_name == "MXFP4":
            raw[:, 0] = torch.randint(100, 150, (nb,), generator=g, device=dev).to(torch.uint8)
        return {"raw": raw.reshape(-1), "ggml_type": int(t), "shape": (out_f, in_f)}

    return ("ggml", type_name, build)


CASES: list[Case] = [
    ct_int(4, 128, True),
    ct_int(4, 128, False),
    ct_int(4, 128, False, act_order=True),
    ct_int(8, -1, True),
    gptq(4, 128),
    gptq(4, 128, act_order=True),
    gptq(3, 128, "gptq_v2"),
    gptq(8, 128),
    awq(128),
    hqq(4, 64, 1),
    hqq(3, 64, 1, torch.float16),
    bnb4("nf4", 64, True),
    bnb4("fp4", 64, False),
    ct_fp4("mxfp4"),
    ct_fp4("nvfp4"),
    gptoss_mxfp4(),
    fp8("tensor"),
    fp8("channel"),
    fp8("block"),
    *(ggml(t) for t in _GGML_F16),
]


# ---------------------------------------------------------------------------------------------------------------


def _bench(fn: Callable[[], object], smoke: bool) -> float:
    """Median seconds of ``fn``."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def _nbytes(args: dict) -> int:
    return sum(v.numel() * v.element_size() for v in args.values() if isinstance(v, torch.Tensor))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="4096x14336", help="weight [out]x[in] (default 4096x14336)")
    ap.add_argument("--json", type=Path, help="write the rows (and machine, copy bandwidth) here")
    ap.add_argument("--only", default="", help="comma-separated layouts to run (default: all)")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1 on a 256x512 weight")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the torch references")
    a = ap.parse_args(argv)
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        a.shape = "256x512"
    elif not torch.cuda.is_available():
        print("kernels_dequant: needs CUDA (or --smoke for the CPU interpreter)", file=sys.stderr)
        return 2
    from qconv.kernels.verify import LAYOUTS

    dev = torch.device("cpu" if a.smoke else "cuda")
    out_f, in_f = (int(x) for x in a.shape.lower().split("x"))
    only = {s for s in a.only.split(",") if s}

    # device-to-device copy of a float32 buffer the size of one output: read + write
    n_out = out_f * in_f * 4
    src = torch.empty(n_out, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = _bench(partial(dst.copy_, src), a.smoke)
    copy_gbs = 2 * n_out / copy_s / 1e9
    del src, dst

    rows = []
    for layout, label, build in CASES:
        if only and layout not in only:
            continue
        ref_fn, kern = LAYOUTS.get(layout, (None, None))
        if kern is None:
            rows.append({"layout": layout, "case": label, "error": "no Triton kernel registered"})
            continue
        args = build(dev, out_f, in_f)
        nbytes = _nbytes(args) + n_out
        got = kern(**args)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        kern_s = _bench(partial(kern, **args), a.smoke)
        ref = ref_fn(**args)
        exact = _same_bits(got, ref.to(got.device))
        ref_s = None if a.no_reference else _bench(partial(ref_fn, **args), a.smoke)
        gbs = nbytes / kern_s / 1e9
        rows.append({
            "layout": layout, "case": label, "bytes": nbytes, "kernel_us": kern_s * 1e6, "gb_s": gbs,
            "pct_copy": 100 * gbs / copy_gbs, "reference_us": None if ref_s is None else ref_s * 1e6,
            "speedup_vs_reference": None if ref_s is None else ref_s / kern_s, "exact": exact,
        })  # fmt: skip
        del args, got, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({platform.processor()}), interpreter"
    print(f"Dequantization kernels on a [{out_f}, {in_f}] weight, {device_name}")
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write of {n_out / 1e6:.1f} MB)\n")
    print("| layout | case | MB moved | kernel µs | GB/s | % of copy | torch ref µs | × ref | exact |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['layout']} | {r['case']} | | | | | | | {r['error']} |")
            continue
        ref_us = "" if r["reference_us"] is None else f"{r['reference_us']:.0f}"
        speed = "" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.1f}"
        print(
            f"| {r['layout']} | {r['case']} | {r['bytes'] / 1e6:.1f} | {r['kernel_us']:.1f} | {r['gb_s']:.0f} | "
            f"{r['pct_copy']:.0f} | {ref_us} | {speed} | {'yes' if r['exact'] else 'NO'} |"
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "device": device_name,
            "shape": [out_f, in_f],
            "copy_gb_s": copy_gbs,
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
            "rows": rows,
        }
        a.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if all(r.get("exact", False) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

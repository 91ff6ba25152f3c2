"""kernels/triton_<layout>.py: every Triton dequantizer equals its layout's torch reference bit for bit (GPTQ v1/v2,
AWQ GEMM, HQQ, bitsandbytes NF4/FP4 with and without double quant), on arbitrary packed words (odd sizes, several
programs with partial tiles, single rows/elements) and on what qconv's own packers write; the verifier runs them
under ``--verify kernel`` and catches a flipped bit; `qconv quantize --verify kernel` works for every format.

Kernels run on CPU under Triton's interpreter (TRITON_INTERPRET=1, set per test by the ``device`` fixture; the
kernels are jitted lazily, at launch, in the mode current then) and, where CUDA is present (`make gpu-test`),
compiled on the GPU: the ``device`` fixture adds a ``gpu``-marked CUDA variant. References run on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from qconv.errors import VerificationError
from qconv.formats import awq as awq_fmt
from qconv.formats import bnb as bnb_fmt
from qconv.formats import gptq as gptq_fmt
from qconv.formats import hqq as hqq_fmt
from qconv.kernels import (
    awq,
    bnb4,
    fp8,
    gptq,
    hqq,
    mx,
    triton_awq,
    triton_bnb4,
    triton_fp8,
    triton_gptq,
    triton_hqq,
    triton_mx,
    verify,
)
from qconv.kernels._triton import HAVE_TRITON
from qconv.quant import hqq as hqq_quant
from qconv.quant import nf4
from qconv.quant.int_grid import quantize_weight
from qconv.quant.tensor import IntGrid

from conftest import tiny_model

needs_triton = pytest.mark.skipif(
    not HAVE_TRITON, reason="triton is not installed (pip install 'qconv[gpu]'); kernels need it even on CPU"
)
pytestmark = [pytest.mark.triton, needs_triton]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    """Where kernels run: CPU under the interpreter, or CUDA compiled (interpreter off)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "cpu" else "0")
    return request.param


def on(device: str, args: dict) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    return (
        a.shape == b.shape
        and a.dtype == b.dtype == torch.float32
        and torch.equal(a.view(torch.int32), b.view(torch.int32))
    )


def check(kernel, reference, args: dict, device: str, **tiles) -> None:
    ref = reference(**args)
    got = kernel(**on(device, args), **tiles)
    assert same_bits(got, ref), f"{int((got.cpu() != ref).sum())} of {ref.numel()} elements differ"


def words(shape, g: torch.Generator) -> torch.Tensor:
    """Arbitrary int32 words (every bit pattern, sign bit included)."""
    return torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(torch.int32)


def bytes_(shape, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------
# GPTQ


def gptq_case(out_f, in_f, groups, bits, fmt, gidx_kind, seed):
    g = torch.Generator().manual_seed(seed)
    if gidx_kind == "act-order":  # a permutation of contiguous groups
        gidx = (torch.arange(in_f) * groups // in_f)[torch.randperm(in_f, generator=g)]
    elif gidx_kind == "random":
        gidx = torch.randint(0, groups, (in_f,), generator=g)
    else:
        gidx = torch.arange(in_f) * groups // in_f
    return {
        "qweight": words((-(-in_f * bits // 32), out_f), g),
        "qzeros": words((groups, -(-out_f * bits // 32)), g),
        "scales": (torch.randn(groups, out_f, generator=g) * 0.01).half(),
        "g_idx": gidx.to(torch.int32),
        "bits": bits,
        "checkpoint_format": fmt,
    }


GPTQ_SHAPES = [
    (37, 100, 5, "random", {}),  # two row programs, 100 columns in one 128-wide tile; 3 bits straddle words
    (1, 32, 1, "trivial", {}),  # one row, one group
    (45, 24, 3, "act-order", {"block_o": 16, "block_i": 16}),  # several programs both ways, partial tiles
    (8, 264, 4, "trivial", {"block_o": 8, "block_i": 256}),  # a partial second column tile
]


@pytest.mark.parametrize("out_f, in_f, groups, gidx_kind, tiles", GPTQ_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("fmt", gptq.FORMATS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_kernel_equals_reference(bits, fmt, out_f, in_f, groups, gidx_kind, tiles, device):
    args = gptq_case(out_f, in_f, groups, bits, fmt, gidx_kind, seed=bits * 100 + out_f)
    check(triton_gptq.dequant_triton, gptq.dequant_reference, args, device, **tiles)


@pytest.mark.parametrize("fmt", gptq.FORMATS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_kernel_on_packed_zero_points_at_the_ends(bits, fmt, device):
    # zero points 0 and 2^bits − 1 in every field: v1 stores 0 as a borrow from the next field (whole-word −1)
    g = torch.Generator().manual_seed(bits)
    out_f, in_f, groups = 40, 64, 4
    zeros = torch.randint(0, 2, (groups, out_f), generator=g) * ((1 << bits) - 1)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    scales = (torch.rand(groups, out_f, generator=g) + 0.5).half()
    gidx = torch.arange(in_f) // (in_f // groups)
    args = {
        "qweight": gptq_fmt.pack_qweight(codes.to(torch.uint8), bits),
        "qzeros": gptq_fmt.pack_qzeros(zeros, bits, fmt),
        "scales": scales,
        "g_idx": gidx.to(torch.int32),
        "bits": bits,
        "checkpoint_format": fmt,
    }
    expected = (codes.float() - zeros.float()[gidx].T) * scales.float()[gidx].T
    assert same_bits(gptq.dequant_reference(**args), expected)
    assert same_bits(triton_gptq.dequant_triton(**on(device, args)), expected)


def gptq_packed(bits=4, fmt="gptq", act_order=True):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(bits)) * 0.02
    gidx = None
    if act_order:
        perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
        gidx = torch.empty(128, dtype=torch.int64)
        gidx[perm] = torch.arange(128) // 32
    qt = quantize_weight(w, IntGrid(bits, 32, False, scale_dtype=torch.float16), gidx=gidx)
    return qt.dequantize(torch.float32), gptq_fmt.gptq_kernel_args(gptq_fmt.pack_gptq(qt, fmt), bits, fmt)


@pytest.mark.parametrize("fmt", gptq.FORMATS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_kernel_on_quantized_weights(bits, fmt, device):
    expected, args = gptq_packed(bits, fmt)
    assert same_bits(triton_gptq.dequant_triton(**on(device, args)), expected)


# ---------------------------------------------------------------------------------------------------------------
# AWQ


def awq_case(out_f, in_f, group, seed):
    g = torch.Generator().manual_seed(seed)
    n_words, groups = -(-out_f // 8), in_f // group
    return {
        "qweight": words((in_f, n_words), g),
        "qzeros": words((groups, n_words), g),
        "scales": (torch.randn(groups, out_f, generator=g) * 0.01).half(),
        "group_size": group,
    }


AWQ_SHAPES = [
    (64, 128, 32, {}),
    (36, 96, 32, {}),  # out not a multiple of 8: the last word is half used
    (8, 64, 64, {}),  # one word per row, one group
    (72, 48, 16, {"block_o": 16, "block_i": 32}),  # several programs both ways, partial tiles
]


@pytest.mark.parametrize("out_f, in_f, group, tiles", AWQ_SHAPES, ids=lambda v: str(v))
def test_awq_kernel_equals_reference(out_f, in_f, group, tiles, device):
    check(triton_awq.dequant_triton, awq.dequant_reference, awq_case(out_f, in_f, group, out_f + in_f), device, **tiles)


def awq_packed():
    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    qt = quantize_weight(w, IntGrid(4, 64, False, scale_dtype=torch.float16))
    return qt.dequantize(torch.float32), awq_fmt.awq_kernel_args(awq_fmt.pack_awq_linear(qt), 64)


def test_awq_kernel_on_quantized_weights(device):
    expected, args = awq_packed()
    assert same_bits(triton_awq.dequant_triton(**on(device, args)), expected)


# ---------------------------------------------------------------------------------------------------------------
# HQQ

HQQ_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def hqq_case(shape, nbits, group, axis, dtype, seed, zero_dtype=None):
    g = torch.Generator().manual_seed(seed)
    rows, cols = hqq.grouped_shape(shape, group, axis)
    pshape, pdtype = hqq_fmt.packed_shape((rows, cols), nbits)
    w_q = bytes_(pshape, g) if pdtype == torch.uint8 else words(pshape, g)
    n_groups = rows if axis == 1 else cols
    gshape = (n_groups, 1) if axis == 1 else (1, n_groups)
    return {
        "W_q": w_q,
        "scale": (torch.randn(gshape, generator=g) * 0.02).to(dtype),
        "zero": (torch.rand(gshape, generator=g) * ((1 << nbits) - 1)).to(zero_dtype or dtype),
        "shape": shape,
        "nbits": nbits,
        "group_size": group,
        "axis": axis,
    }


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 6, 8])
def test_hqq_kernel_equals_reference(nbits, axis, device):
    # grouped rows: 80 (axis 1; 3 bits pad to 8 int32 rows) or 16 (axis 0); compute dtype rotates
    dtype = HQQ_DTYPES[(nbits + axis) % 3]
    args = hqq_case((32, 40), nbits, 16, axis, dtype, seed=nbits * 2 + axis)
    check(triton_hqq.dequant_triton, hqq.dequant_reference, args, device, block_r=16, block_k=16)


@pytest.mark.parametrize(
    "shape, nbits, group, axis, dtype, zero_dtype, tiles",
    [
        ((2, 64), 4, 64, 1, torch.bfloat16, None, {}),  # one packed row: two groups in two nibbles
        ((24, 24), 3, 8, 1, torch.float16, torch.float32, {"block_r": 8, "block_k": 8}),  # zero rounded to fp16
        ((40, 64), 2, 32, 0, torch.bfloat16, torch.float32, {}),  # zero rounded to bf16; rows 32 / 4 chunks
        ((16, 48), 8, 128, 0, torch.float32, torch.bfloat16, {"block_r": 32, "block_k": 2}),
    ],
)
def test_hqq_kernel_odd_cases(shape, nbits, group, axis, dtype, zero_dtype, tiles, device):
    args = hqq_case(shape, nbits, group, axis, dtype, seed=sum(shape), zero_dtype=zero_dtype)
    check(triton_hqq.dequant_triton, hqq.dequant_reference, args, device, **tiles)


def hqq_packed(nbits=4, axis=1, dtype=torch.bfloat16):
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(nbits)) * 0.02
    grid = hqq_quant.HQQGrid(nbits, 32, False, scale_dtype=dtype, axis=axis)
    qt = hqq_quant.quantize_hqq(w, grid, hqq_quant.HQQConfig(iters=3))
    return qt.dequantize(torch.float32), hqq_fmt.kernel_args(hqq_fmt.hqq_tensors(qt, dtype))


@pytest.mark.parametrize("nbits, axis, dtype", [(4, 1, torch.bfloat16), (3, 0, torch.float16), (2, 1, torch.float32)])
def test_hqq_kernel_on_quantized_weights(nbits, axis, dtype, device):
    expected, args = hqq_packed(nbits, axis, dtype)
    assert same_bits(triton_hqq.dequant_triton(**on(device, args)), expected)


# ---------------------------------------------------------------------------------------------------------------
# bitsandbytes NF4 / FP4


def bnb_case(shape, quant_type, blocksize, nested, seed, nested_blocksize=256):
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    nb = -(-n // blocksize)
    args = {
        "packed": bytes_((-(-n // 2), 1), g),
        "quant_map": bnb_fmt.stored_quant_map(quant_type),
        "shape": shape,
        "blocksize": blocksize,
    }
    if nested:
        args |= {
            "absmax": bytes_((nb,), g),
            "nested_absmax": torch.rand(-(-nb // nested_blocksize), generator=g) * 0.1,
            "nested_quant_map": nf4.dynamic_map(),
            "nested_offset": float(torch.rand(1, generator=g)) * 0.05,  # a double, rounded to float32 by both
            "nested_blocksize": nested_blocksize,
        }
    else:
        args["absmax"] = torch.rand(nb, generator=g) * 0.1
    return args


@pytest.mark.parametrize(
    "shape, blocksize, nested_blocksize, tiles",
    [
        ((33, 71), 64, 256, {}),  # odd element count: the last byte holds one code; a partial last block
        ((130, 131), 64, 256, {"block": 4096}),  # 267 blocks: a second nested block; a partial last program
        ((1, 1), 64, 256, {}),  # a single element
        ((16, 64), 32, 8, {"block": 128}),  # several programs, small nested blocks
    ],
)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb4_kernel_equals_reference(quant_type, nested, shape, blocksize, nested_blocksize, tiles, device):
    args = bnb_case(shape, quant_type, blocksize, nested, seed=sum(shape) + nested, nested_blocksize=nested_blocksize)
    check(triton_bnb4.dequant_triton, bnb4.dequant_reference, args, device, **tiles)


def bnb_packed(quant_type="nf4", double_quant=True, blocksize=64):
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(4)) * 0.02
    grid = nf4.Bnb4Grid(quant_type, blocksize, double_quant)
    qt = nf4.quantize_weight(w, grid)
    t = bnb_fmt.pack_bnb4(qt)
    state = bnb_fmt.quant_state(grid, qt.shape, float(qt.offset) if double_quant else None)
    return qt.dequantize(torch.float32), bnb_fmt.kernel_args(t, state)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", True), ("nf4", False)])
def test_bnb4_kernel_on_quantized_weights(quant_type, double_quant, device):
    expected, args = bnb_packed(quant_type, double_quant)
    got = triton_bnb4.dequant_triton(**on(device, args))
    assert same_bits(got, bnb4.dequant_reference(**args))
    # equal as numbers (the verifier's test): bitsandbytes stores FP4's code 8 as +0.0 where qconv's table has −0.0
    assert torch.equal(got.cpu(), expected)


# ---------------------------------------------------------------------------------------------------------------
# FP4 (E2M1): compressed-tensors MXFP4 / NVFP4, gpt-oss MXFP4


def ct_fp4_case(out_f, in_f, kind, seed, global_scale=True):
    """Arbitrary codes and every scale byte: E8M0 0 (subnormal 2^-127) and 255 (inf), E4M3 subnormals, ±0, NaN."""
    g = torch.Generator().manual_seed(seed)
    block = 32 if kind == "mxfp4" else 16
    sb = bytes_((out_f, in_f // block), g)
    sb.view(-1)[:4] = torch.tensor([0, 255, 0x7F, 0x81], dtype=torch.uint8)[: sb.numel()]
    return {
        "packed": bytes_((out_f, in_f // 2), g),
        "scale": sb if kind == "mxfp4" else sb.view(torch.float8_e4m3fn),
        "shape": (out_f, in_f),
        "global_scale": torch.rand(1, generator=g) * 100 if kind == "nvfp4" and global_scale else None,
        "block": block,
    }


def same_bits_or_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal wherever ``b`` is a number, NaN where it is NaN (payloads are not reproduced on GPUs)."""
    a, b = a.cpu(), b.cpu()
    nan = torch.isnan(b)
    return a.shape == b.shape and torch.equal(torch.isnan(a), nan) and same_bits(a[~nan], b[~nan])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf/NaN scales on purpose (numpy warns)
@pytest.mark.parametrize(
    "out_f, in_f, kind, global_scale, tiles",
    [
        (37, 96, "mxfp4", False, {}),  # 3 row programs of 16
        (5, 80, "nvfp4", True, {}),
        (21, 48, "nvfp4", False, {"block_r": 8, "block_c": 16}),  # several programs both ways
        (1, 32, "mxfp4", False, {"block_c": 64}),  # one block, a mostly masked tile
        (3, 272, "nvfp4", True, {"block_c": 256}),  # a partial second column tile
    ],
)
def test_ct_fp4_kernel_equals_reference(out_f, in_f, kind, global_scale, tiles, device):
    args = ct_fp4_case(out_f, in_f, kind, seed=out_f * in_f, global_scale=global_scale)
    ref = mx.ct_fp4_reference(**args)
    assert same_bits_or_nan(triton_mx.ct_fp4_triton(**on(device, args), **tiles), ref)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf/NaN scales on purpose (numpy warns)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead", [(), (3,), (2, 5)])  # plain linear, experts, a 2-D stack
def test_gptoss_kernel_equals_reference(lead, out_dtype, device):
    g = torch.Generator().manual_seed(len(lead))
    blocks = bytes_((*lead, 7, 3, 16), g)
    scales = bytes_((*lead, 7, 3), g)
    scales.view(-1)[:3] = torch.tensor([0, 255, 1], dtype=torch.uint8)
    ref = mx.gptoss_reference(blocks, scales, out_dtype)
    got = triton_mx.gptoss_triton(blocks=blocks.to(device), scales=scales.to(device), out_dtype=out_dtype, block_b=8)
    assert got.shape == (*lead, 7, 96)
    assert same_bits_or_nan(got, ref)


def fp4_packed(kind="mxfp4"):
    from qconv.formats import ct_fp4
    from qconv.quant import mx as mx_quant

    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(6)) * 0.02
    grid = mx_quant.FP4Grid(kind)
    qt = (mx_quant.quantize_mxfp4 if kind == "mxfp4" else mx_quant.quantize_nvfp4)(w, grid)
    t = ct_fp4.FP4Scheme(kind).tensors(qt)
    return qt.dequantize(torch.float32), ct_fp4.kernel_args(t, qt.shape, grid.block)


@pytest.mark.parametrize("kind", ["mxfp4", "nvfp4"])
def test_ct_fp4_kernel_on_quantized_weights(kind, device):
    expected, args = fp4_packed(kind)
    got = triton_mx.ct_fp4_triton(**on(device, args))
    assert same_bits(got, mx.ct_fp4_reference(**args))
    assert torch.equal(got.cpu(), expected)


# ---------------------------------------------------------------------------------------------------------------
# FP8 (tensor / channel / block scales)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NaN/inf FP8 codes on purpose (numpy warns)
@pytest.mark.parametrize(
    "shape, scale_kind, block_size, tiles",
    [
        ((6, 128), "tensor", None, {}),  # every byte value three times: ±0, subnormals, max, NaN
        ((37, 96), "channel", None, {}),
        ((45, 200), "block", (16, 64), {"block_r": 16, "block_c": 64}),  # partial edge blocks, several programs
        ((3, 40), "block", (128, 128), {}),  # one partial block
        ((1, 1), "tensor", (128, 128), {}),  # a scalar scale with a block size given
    ],
)
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_kernel_equals_reference(fp8_dtype, shape, scale_kind, block_size, tiles, device):
    g = torch.Generator().manual_seed(shape[0] * shape[1])
    n = shape[0] * shape[1]
    raw = torch.arange(n, dtype=torch.int64) % 256 if n % 256 == 0 else bytes_((n,), g)
    weight = raw.to(torch.uint8).reshape(shape).view(fp8_dtype)
    if scale_kind == "tensor":
        scale = torch.rand(1, generator=g)
    elif scale_kind == "channel":
        scale = torch.rand(shape[0], 1, generator=g).bfloat16()  # widened exactly, as the reference does
    else:
        scale = torch.rand(-(-shape[0] // block_size[0]), -(-shape[1] // block_size[1]), generator=g)
    args = {"weight": weight, "scale": scale, "block_size": block_size}
    got = triton_fp8.dequant_triton(**on(device, args), **tiles)
    assert same_bits_or_nan(got, fp8.dequant_reference(**args))


def fp8_packed(kind="block"):
    from qconv.formats import (
        compressed_tensors,  # noqa: F401 - first: importing ct_fp8 alone is circular
        ct_fp8,
    )
    from qconv.quant import fp8 as fp8_quant

    w = torch.randn(40, 160, generator=torch.Generator().manual_seed(8)) * 0.02
    qt = fp8_quant.quantize_weight(w, fp8_quant.Fp8Grid(kind, block=32))
    t = ct_fp8.fp8_tensors(qt)
    return qt.dequantize(torch.float32), {
        "weight": t["weight"],
        "scale": t["weight_scale"],
        "block_size": qt.grid.block_size,
    }


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_fp8_kernel_on_quantized_weights(kind, device):
    expected, args = fp8_packed(kind)
    assert same_bits(triton_fp8.dequant_triton(**on(device, args)), expected)


# ---------------------------------------------------------------------------------------------------------------
# The verifier


def test_every_layout_has_a_kernel():
    missing = [name for name, (_, kern) in verify.LAYOUTS.items() if kern is None]
    assert not missing, f"layouts without a Triton kernel: {missing}"


# layout → (expected, args) from qconv's own packers, and the packed tensor + byte whose bit is flipped
PACKED = {
    "gptq": (lambda: gptq_packed(3, "gptq"), "qweight", 100),
    "awq": (awq_packed, "qweight", 100),
    "hqq": (lambda: hqq_packed(4, 1, torch.bfloat16), "W_q", 100),
    "bnb4": (bnb_packed, "packed", 777),
    "ct-fp4": (lambda: fp4_packed("nvfp4"), "packed", 100),
    "fp8": (fp8_packed, "weight", 100),
}


@pytest.mark.parametrize("layout", list(PACKED))
def test_verifier_kernel_path_catches_a_flipped_bit(layout, device):
    make, key, byte = PACKED[layout]
    expected, args = make()
    v = verify.Verifier("kernel")
    v.check("model.layers.0.mlp.up_proj", layout, expected.to(device), **args)
    assert v.paths == {"kernel"} and v.checked == 1
    bad = dict(args)
    bad[key] = args[key].clone()
    bad[key].view(torch.uint8).view(-1)[byte] ^= 1 << 1  # one bit of one byte of the packed tensor
    with pytest.raises(VerificationError, match=rf"^model\.layers\.1\.mlp\.down_proj: packed {layout} layout"):
        v.check("model.layers.1.mlp.down_proj", layout, expected.to(device), **bad)


# ---------------------------------------------------------------------------------------------------------------
# qconv quantize --verify kernel, one run per format


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_files):
    return tiny_model(tmp_path_factory.mktemp("tiny"), "llama", tokenizer_files)


@pytest.mark.parametrize(
    "fmt, extra",
    [
        ("gptq", ("--method", "rtn", "--bits", "3", "--group-size", "32", "--asym")),
        ("awq", ("--method", "rtn", "--bits", "4", "--group-size", "32", "--asym")),
        ("hqq", ("--method", "hqq", "--bits", "4", "--group-size", "64", "--asym", "--opt", "hqq_iters=2")),
        ("bnb", ("--method", "nf4",)),
        ("safetensors", ("--method", "nvfp4")),
        ("fp8", ("--method", "fp8", "--opt", "fp8_block=32")),
    ],
)  # fmt: skip
def test_quantize_verify_kernel(cli, tiny, tmp_path, monkeypatch, fmt, extra):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CLI itself turns the interpreter on for CPU
    out = tmp_path / fmt
    r = cli("quantize", tiny, "--format", fmt, "--no-calib", "--verify", "kernel", "--out", out, "-q", *extra)
    assert r.code == 0, r.stderr
    v = json.loads((out / "qconv.json").read_text())["verification"]
    assert v == {"mode": "kernel", "paths": ["kernel"], "tensors": 14}


# ---------------------------------------------------------------------------------------------------------------
# bench/kernels_dequant.py (run on a GPU by `run`; here its cases and its CPU smoke mode)


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "kernels_dequant.py"
    spec = importlib.util.spec_from_file_location("kernels_dequant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_cases_build_valid_arguments():
    bench = _bench_module()
    assert {layout for layout, _, _ in bench.CASES} == set(verify.LAYOUTS)  # every layout is benchmarked
    for layout, label, build in bench.CASES:
        args = build(torch.device("cpu"), 32, 256)
        w = verify.LAYOUTS[layout][0](**args)
        assert w.shape == (32, 256) and w.dtype == torch.float32, (layout, label)


def test_bench_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = tmp_path / "kd.json"
    assert _bench_module().main(["--smoke", "--only", "awq,gptoss-mxfp4", "--no-reference", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["shape"] == [256, 512] and doc["copy_gb_s"] > 0
    assert [(r["layout"], r["exact"]) for r in doc["rows"]] == [("awq", True), ("gptoss-mxfp4", True)]


# ---------------------------------------------------------------------------------------------------------------
# Compiled (not interpreted) for the H100 without a GPU: every kernel variant the benchmark launches compiles for
# sm_90, and its PTX holds no fused multiply-add (bit-exactness needs the separate roundings of the references).

_PTR = {torch.uint8: "*u8", torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64",
        torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}  # fmt: skip


def _triton_version() -> tuple[int, ...]:
    import importlib.metadata

    try:
        return tuple(int(p) for p in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


@pytest.mark.slow
@pytest.mark.skipif(
    _triton_version() >= (3, 8),
    reason="triton >= 3.8 cannot compile offline for sm_90 in a session that imported triton in interpreter mode "
    "(3.8: gluon's import asserts; 3.9: the frontend loses the constexprs); the kernels' bit-exactness, which is "
    "what the absence of FMA protects, is checked compiled on the lent GPU by `make gpu-test`",
)
def test_kernels_compile_for_sm90_without_fma(monkeypatch):
    import inspect
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qconv.kernels._triton import lazy_jit

    launches = []
    monkeypatch.setattr(lazy_jit, "__getitem__", lambda self, grid: lambda *a, **kw: launches.append((self, a, kw)))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for layout, _, build in _bench_module().CASES:
        verify.LAYOUTS[layout][1](**build(torch.device("cpu"), 32, 256))
    compiled = set()
    for kernel, args, kw in launches:
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: _PTR[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else "i32"
               for n, a in zip(names, args)}  # fmt: skip
        const = {n: v for n, v in kw.items() if n in names}
        key = (kernel.fn.__name__, tuple(sorted(const.items())))
        if key in compiled:
            continue
        compiled.add(key)
        sig |= dict.fromkeys(const, "constexpr")
        options = {n: v for n, v in kw.items() if n not in names}
        src = ASTSource(triton.jit(kernel.fn), sig, constexprs=const)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        assert not re.search(r"\bfma\.rn\.f32\b", ptx), key
    assert len(compiled) >= 25 and {k[0] for k in compiled} >= {
        "_q45_k_kernel",
        "_gptq_dequant_kernel",
        "_fp8_dequant_kernel",
    }

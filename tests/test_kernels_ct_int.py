"""kernels/ct_int.py and kernels/verify.py: the Triton dequantizer of compressed-tensors pack-quantized weights
equals the plain-torch reference bit for bit, and the verifier catches a corrupted packed word.

Kernels run on CPU under Triton's interpreter: TRITON_INTERPRET=1 is set below before anything imports triton
(``triton.jit`` decides at decoration time whether a kernel is interpreted; qconv's ``lazy_jit`` at launch), and
set again around this module's tests only. Shapes stay small: the interpreter is slow.
Kernel tests carry the ``triton`` marker and skip, with the reason, where triton is not installed; the
reference-path tests need no triton.
"""

from __future__ import annotations

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # must precede every triton import

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from qconv.errors import VerificationError  # noqa: E402
from qconv.formats.bitpack import pack_rows  # noqa: E402
from qconv.formats.compressed_tensors import ct_kernel_args, pack_ct  # noqa: E402
from qconv.kernels import ct_int, verify  # noqa: E402
from qconv.kernels._triton import HAVE_TRITON  # noqa: E402
from qconv.quant.int_grid import quantize_weight  # noqa: E402
from qconv.quant.tensor import IntGrid  # noqa: E402

needs_triton = pytest.mark.skipif(
    not HAVE_TRITON, reason="triton is not installed (pip install 'qconv[gpu]'); kernels need it even on CPU"
)

SCALE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _restore_interpret() -> None:
    if _PREVIOUS_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


# Other test modules run with the environment they were started with; this one sets interpreter mode around its
# own tests (a lazily jitted kernel picks its mode at launch).
_restore_interpret()


@pytest.fixture(scope="module", autouse=True)
def interpreted_kernel():
    """Kernels run in interpreter mode during this module. A kernel declared with plain ``triton.jit`` is fixed in
    the mode of its import: if another test module imported ct_int before TRITON_INTERPRET was set, re-execute the
    module (every holder of its functions, verify.LAYOUTS included, looks the kernel up in the module's globals)."""
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        if HAVE_TRITON:
            from triton.runtime.jit import JITFunction

            if isinstance(getattr(ct_int, "_ct_int_dequant_kernel", None), JITFunction):
                importlib.reload(ct_int)
        yield
    finally:
        _restore_interpret()


def random_layout(out_f, in_f, bits, symmetric, group, scale_dtype, with_gidx, seed):
    """Arbitrary codes, zero points, scales (both signs) and g_idx, packed as compressed-tensors stores them."""
    g = torch.Generator().manual_seed(seed)
    gs = in_f if group == -1 else group
    n_groups = -(-in_f // gs)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g).to(torch.uint8)
    scale = (torch.randn(out_f, n_groups, generator=g) * 0.01).to(scale_dtype)
    if with_gidx:
        gidx = torch.randint(0, n_groups, (in_f,), generator=g, dtype=torch.int64)
        gidx[torch.randperm(in_f, generator=g)[:n_groups]] = torch.arange(n_groups)  # every group used
    else:
        gidx = torch.arange(in_f) // gs
    if symmetric:
        zeros = torch.full((out_f, n_groups), float(1 << (bits - 1)))
        zero_packed = None
    else:
        zi = torch.randint(0, 1 << bits, (out_f, n_groups), generator=g)
        zeros = zi.float()
        zero_packed = pack_rows(zi.T.contiguous(), bits).T.contiguous()
    args = {
        "packed": pack_rows(codes, bits),
        "scale": scale,
        "zero_packed": zero_packed,
        "shape": (out_f, in_f),
        "bits": bits,
        "group_size": gs,
        "g_idx": gidx.to(torch.int32) if with_gidx else None,
    }
    expected = (codes.float() - zeros[:, gidx]) * scale.float()[:, gidx]
    return args, expected


# ---------------------------------------------------------------------------------------------------------------
# Reference dequantizer (no triton needed)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group, with_gidx", [(32, False), (32, True), (-1, False), (8, True)])
def test_reference_matches_the_formula(bits, symmetric, group, with_gidx):
    args, expected = random_layout(33, 96, bits, symmetric, group, SCALE_DTYPES[bits % 3], with_gidx, bits)
    assert torch.equal(ct_int.dequant_reference(**args), expected)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_matches_quantized_tensor(scale_dtype, symmetric):
    for bits in (2, 3, 4, 5, 6, 7, 8):
        w = torch.randn(37, 64, generator=torch.Generator().manual_seed(bits)) * 0.02
        qt = quantize_weight(w, IntGrid(bits, 16, symmetric, scale_dtype=scale_dtype))
        got = ct_int.dequant_reference(**ct_kernel_args(pack_ct(qt), bits, 16))
        assert torch.equal(got, qt.dequantize(torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel == reference, bit for bit

# Every width × sym/asym × group size; scale dtype and g_idx rotate so that each width meets all three scale
# dtypes and both g_idx settings (the full product would be 252 interpreter runs).
MATRIX = [
    (bits, symmetric, group, SCALE_DTYPES[(bits + symmetric + gi) % 3], (bits + symmetric + gi) % 2 == 1)
    for bits in range(2, 9)
    for symmetric in (True, False)
    for gi, group in enumerate((32, 64, -1))
]


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("bits, symmetric, group, scale_dtype, with_gidx", MATRIX)
def test_kernel_equals_reference(bits, symmetric, group, scale_dtype, with_gidx):
    # out = 33 or 21 rows: out·bits is never a multiple of 32, so zero points straddle words
    out_f, in_f = (21, 128) if group == 64 else (33, 96)
    args, expected = random_layout(out_f, in_f, bits, symmetric, group, scale_dtype, with_gidx, bits * 7 + group)
    ref = ct_int.dequant_reference(**args)
    assert torch.equal(ref, expected)
    got = ct_int.dequant_triton(**args, block_r=64, block_c=128)  # one program: the interpreter is slow
    assert got.dtype == torch.float32 and got.shape == (out_f, in_f)
    assert torch.equal(got, ref), (got - ref).abs().max()


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize(
    "out_f, in_f, bits, group, with_gidx, blocks",
    [
        (7, 40, 3, 8, False, {}),
        (7, 40, 5, 8, True, {}),
        (1, 8, 7, 8, False, {}),
        (45, 24, 6, 8, True, {"block_r": 16, "block_c": 16}),  # several programs in both directions
        (5, 160, 5, 32, False, {}),  # two column blocks
        (33, 96, 3, 64, False, {}),  # a partial last group
        (13, 33, 7, -1, True, {"block_r": 8, "block_c": 16}),
    ],
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_odd_shapes(out_f, in_f, bits, group, with_gidx, blocks, symmetric):
    sdt = SCALE_DTYPES[(out_f + in_f) % 3]
    args, expected = random_layout(out_f, in_f, bits, symmetric, group, sdt, with_gidx, out_f * in_f)
    ref = ct_int.dequant_reference(**args)
    assert torch.equal(ref, expected)
    assert torch.equal(ct_int.dequant_triton(**args, **blocks), ref)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kernel_on_quantized_weights(bits):
    # scales/zeros chosen by qconv, act-order g_idx, packed by pack_ct
    w = torch.randn(33, 64, generator=torch.Generator().manual_seed(bits)) * 0.02
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(100 + bits))
    gidx = torch.empty(64, dtype=torch.int64)
    gidx[perm] = torch.arange(64) // 16
    qt = quantize_weight(w, IntGrid(bits, 16, False, scale_dtype=torch.bfloat16), gidx=gidx)
    args = ct_kernel_args(pack_ct(qt), bits, 16)
    assert args["g_idx"] is not None
    assert torch.equal(ct_int.dequant_triton(**args), qt.dequantize(torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Verifier


def packed_case(symmetric=False, bits=3):
    w = torch.randn(33, 64, generator=torch.Generator().manual_seed(5)) * 0.02
    qt = quantize_weight(w, IntGrid(bits, 32, symmetric, scale_dtype=torch.float16))
    return qt.dequantize(torch.float32), ct_kernel_args(pack_ct(qt), bits, 32)


def corrupted(args: dict, key: str, index: tuple[int, int], bit: int = 0) -> dict:
    bad = dict(args)
    t = bad[key].clone()
    t[index] ^= 1 << bit
    bad[key] = t
    return bad


def check_verifier_catches(v: verify.Verifier, expected, args) -> None:
    v.check("model.layers.0.mlp.up_proj", "ct-int", expected, **args)
    for key, index, bit in [("packed", (4, 0), 0), ("packed", (32, 5), 30), ("zero_packed", (0, 1), 2)]:
        with pytest.raises(VerificationError) as ei:
            v.check("model.layers.3.self_attn.q_proj", "ct-int", expected, **corrupted(args, key, index, bit))
        msg = str(ei.value)
        assert msg.startswith("model.layers.3.self_attn.q_proj: ") and "elements differ" in msg
        assert ei.value.exit_code == 1
    # a changed scale is caught too
    bad = dict(args)
    bad["scale"] = args["scale"].clone()
    bad["scale"][7, 1] = -bad["scale"][7, 1]
    with pytest.raises(VerificationError, match="^lm: "):
        v.check("lm", "ct-int", expected, **bad)
    assert v.checked == 1


def test_verifier_reference():
    expected, args = packed_case()
    v = verify.Verifier("reference")
    check_verifier_catches(v, expected, args)
    assert v.paths == {"reference"}
    s = v.summary()
    assert s["mode"] == "reference" and s["paths"] == ["reference"] and s["tensors"] == 1 and s["seconds"] >= 0


def test_verifier_shape_mismatch():
    expected, args = packed_case(symmetric=True)
    with pytest.raises(VerificationError, match=r"^x: .*shape \(33, 64\) vs \(33, 63\)"):
        verify.Verifier("reference").check("x", "ct-int", expected[:, :63], **args)


def test_verifier_off_and_auto_on_cpu():
    expected, args = packed_case()
    off = verify.Verifier("off")
    off.check("x", "ct-int", expected, **corrupted(args, "packed", (0, 0)))
    assert off.checked == 0 and off.summary()["tensors"] == 0
    auto = verify.Verifier("auto")
    auto.check("x", "ct-int", expected, **args)
    assert auto.paths == {"reference"}  # CPU tensors: the kernel is only the automatic choice on CUDA
    with pytest.raises(ValueError, match="verify mode"):
        verify.Verifier("sometimes")


@pytest.mark.triton
@needs_triton
def test_verifier_kernel_under_interpreter():
    expected, args = packed_case()
    v = verify.Verifier("kernel")
    check_verifier_catches(v, expected, args)
    assert v.paths == {"kernel"}
    expected, args = packed_case(symmetric=True, bits=5)
    v.check("sym", "ct-int", expected, **args)
    with pytest.raises(VerificationError, match="^sym: "):
        v.check("sym", "ct-int", expected, **corrupted(args, "packed", (10, 3), 7))


@pytest.mark.triton
@needs_triton
def test_verifier_kernel_refuses_cpu_without_interpreter(monkeypatch):
    expected, args = packed_case()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        verify.Verifier("kernel").check("x", "ct-int", expected, **args)

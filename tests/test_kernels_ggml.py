"""kernels/ggml.py: the Triton dequantizers of GGML block bytes equal the torch reference (ggml_blocks.dequantize)
and gguf-py's ``gguf.quants.dequantize`` bit for bit, for every block type qconv writes (and ggml's MXFP4), and
``qconv quantize --format gguf --verify kernel`` runs them on every tensor it writes.

Kernels run on CPU under Triton's interpreter (TRITON_INTERPRET=1, set per test by the ``device`` fixture; the
kernels are jitted lazily, at launch, in the mode current then) and, where CUDA is present (`make gpu-test`),
compiled on the GPU too: the ``device`` fixture adds a ``gpu``-marked CUDA variant of every kernel test. The
reference always runs on CPU, so a GPU result is compared with the CPU float32 arithmetic of ggml.
"""

from __future__ import annotations

import json

import ggml_ref
import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from qconv.errors import VerificationError
from qconv.formats.ggml_blocks import BLOCK_SIZE, TYPE_SIZE, GGMLType
from qconv.kernels import ggml as kg
from qconv.kernels import verify
from qconv.kernels._triton import HAVE_TRITON
from qconv.quant.ggml_grid import SUPPORTED_TYPES

from conftest import tiny_model

T = GGMLType
needs_triton = pytest.mark.skipif(
    not HAVE_TRITON, reason="triton is not installed (pip install 'qconv[gpu]'); kernels need it even on CPU"
)

# Byte offsets of the fp16 scale members in each block struct (ggml-common.h), overwritten with finite values.
F16_OFFSETS: dict[T, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
    T.IQ4_NL: (0,),
    T.IQ4_XS: (0,),
    T.MXFP4: (),
}
TYPES = list(F16_OFFSETS)
WRITTEN_TYPES = [t for t in TYPES if t != T.MXFP4]  # the 12 types `qconv quantize --format gguf` produces


def test_kernel_table_covers_every_written_type():
    assert set(TYPES) == set(kg.KERNEL_TYPES)
    assert set(SUPPORTED_TYPES) == set(WRITTEN_TYPES)  # what qconv's GGML grids (hence the writer) can emit


def random_blocks(t: T, n_blocks: int, seed: int, finite: bool = True) -> torch.Tensor:
    """Arbitrary block bytes uint8 [n_blocks, TYPE_SIZE]; with ``finite``, fp16 scales are finite (both signs,
    subnormals included) and MXFP4 exponents stay where every product is finite."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n_blocks, TYPE_SIZE[t]), generator=g, dtype=torch.uint8)
    if finite:
        for off in F16_OFFSETS[t]:
            scale = torch.randn(n_blocks, generator=g) * 10.0 ** torch.randint(-8, 1, (n_blocks,), generator=g)
            raw[:, off : off + 2] = scale.half().view(torch.uint8).reshape(n_blocks, 2)
        if t == T.MXFP4:
            raw[:, 0] = torch.randint(0, 250, (n_blocks,), generator=g).to(torch.uint8)  # e < 2: subnormal scales
            raw[: min(n_blocks, 2), 0] = torch.tensor([0, 1][: min(n_blocks, 2)], dtype=torch.uint8)
    return raw


def gguf_py(raw: torch.Tensor, t: T, shape: tuple[int, ...]) -> torch.Tensor:
    out = gguf_dequantize(raw.reshape(-1).numpy(), gguf.GGMLQuantizationType(int(t)))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    """Where kernels run: CPU under the interpreter, or CUDA compiled (interpreter off)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "cpu" else "0")
    return request.param


def run_kernel(raw: torch.Tensor, t: T, shape: tuple[int, ...], device: str, **kw) -> torch.Tensor:
    return kg.dequant_triton(raw=raw.to(device), ggml_type=int(t), shape=shape, **kw).cpu()


# ---------------------------------------------------------------------------------------------------------------
# Kernel == reference == gguf-py

# (rows, blocks per row, block_b): one block; rows × blocks not a multiple of the blocks per program (several
# programs, a partial last one); one program mostly masked off; a single row of many blocks.
SHAPES = [(1, 1, None), (3, 5, 4), (7, 3, None), (1, 9, 2)]


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("rows, per_row, block_b", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_equals_reference_and_gguf_py(t, rows, per_row, block_b, device):
    shape = (rows, per_row * BLOCK_SIZE[t])
    raw = random_blocks(t, rows * per_row, seed=int(t) * 100 + rows * 10 + per_row).reshape(-1)
    ref = kg.dequant_reference(raw=raw, ggml_type=int(t), shape=shape)
    assert same_bits(ref, gguf_py(raw, t, shape))
    got = run_kernel(raw, t, shape, device, block_b=block_b)
    assert same_bits(got, ref), f"{int((got != ref).sum())} elements differ"


@pytest.mark.triton
@needs_triton
@pytest.mark.skipif(not ggml_ref.available(), reason="llama.cpp's libggml (llama-cpp-python) is not installed")
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_on_llama_cpp_quantized_blocks(t, device):
    # blocks written by llama.cpp's own quantizer from Gaussian weights with outliers: real scale/min patterns
    g = torch.Generator().manual_seed(int(t))
    w = torch.randn(6, 512, generator=g) * 0.02
    w[torch.rand(w.shape, generator=g) < 0.01] *= 30
    raw = ggml_ref.quantize(w, t).reshape(-1)
    got = run_kernel(raw, t, tuple(w.shape), device)
    assert same_bits(got, gguf_py(raw, t, tuple(w.shape)))
    assert same_bits(got, kg.dequant_reference(raw, int(t), tuple(w.shape)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # inf/NaN scales on purpose (numpy warns)
@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_on_arbitrary_bytes(t, device):
    # NaN/Inf/subnormal scales and every exponent: equal wherever the reference is a number, NaN where it is NaN
    raw = random_blocks(t, 40, seed=7 + int(t), finite=False).reshape(-1)
    shape = (40 * BLOCK_SIZE[t],)
    ref = kg.dequant_reference(raw, int(t), shape)
    got = run_kernel(raw, t, shape, device, block_b=16)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    assert same_bits(got[~nan], ref[~nan])


@pytest.mark.triton
@needs_triton
def test_kernel_input_forms(device):
    t = T.Q4_K
    raw = random_blocks(t, 6, seed=1)  # [n_blocks, TYPE_SIZE] = [rows, row_bytes] for one block per row
    ref = kg.dequant_reference(raw.reshape(-1), int(t), (2, 3, 256))
    assert same_bits(run_kernel(raw.reshape(3, -1), t, (2, 3, 256), device), ref)  # 2-D raw, 3-D shape
    assert same_bits(run_kernel(raw.reshape(-1)[:0], t, (0, 256), device), torch.empty(0, 256))
    # a non-contiguous view of the bytes
    wide = torch.zeros(6, 2 * TYPE_SIZE[t], dtype=torch.uint8)
    wide[:, ::2] = raw
    assert same_bits(run_kernel(wide[:, ::2], t, (6, 256), device), ref.reshape(6, 256))


@needs_triton
def test_kernel_rejects_bad_input():
    raw = random_blocks(T.Q4_0, 2, seed=0).reshape(-1)
    with pytest.raises(ValueError, match="Q4_0: 64 elements need .* 36 bytes, got 35 bytes"):
        kg.dequant_triton(raw[:-1], int(T.Q4_0), (2, 32))
    with pytest.raises(ValueError, match="Q4_0: 48 elements need a multiple of 32"):
        kg.dequant_triton(raw, int(T.Q4_0), (48,))
    with pytest.raises(ValueError, match="uint8"):
        kg.dequant_triton(raw.to(torch.int16), int(T.Q4_0), (2, 32))
    with pytest.raises(NotImplementedError, match="no Triton dequantization kernel for GGML type F16"):
        kg.dequant_triton(raw, int(T.F16), (18,))


@pytest.mark.gpu
@pytest.mark.triton
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_kernel_large_on_cuda(t, monkeypatch):
    # many programs at the default tile sizes, with a row count no tile divides
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    shape = (1031, 4096)
    raw = random_blocks(t, shape[0] * shape[1] // BLOCK_SIZE[t], seed=3).reshape(-1)
    got = kg.dequant_triton(raw.cuda(), int(t), shape)
    assert same_bits(got.cpu(), kg.dequant_reference(raw, int(t), shape))


# ---------------------------------------------------------------------------------------------------------------
# The verifier's "ggml" layout


def layout_case(t: T) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    raw = random_blocks(t, 8, seed=11).reshape(-1)
    shape = (2, 4 * BLOCK_SIZE[t])
    return raw, kg.dequant_reference(raw, int(t), shape), shape


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("t", [T.Q6_K, T.Q5_1], ids=lambda t: t.name)
def test_verifier_runs_the_ggml_kernel_and_catches_bad_bytes(t, device):
    assert verify.LAYOUTS["ggml"][1] is kg.dequant_triton
    raw, expected, shape = layout_case(t)
    v = verify.Verifier("kernel")
    v.check("blk.0.ffn_down.weight", "ggml", expected.to(device), raw=raw, ggml_type=int(t), shape=shape)
    assert v.paths == {"kernel"} and v.checked == 1
    for byte, bit in [(TYPE_SIZE[t] - 1, 0), (5 * TYPE_SIZE[t] + 40, 6)]:  # a scale bit / a quant bit
        bad = raw.clone()
        bad[byte] ^= 1 << bit
        with pytest.raises(VerificationError, match=r"^blk\.3\.attn_q\.weight: packed ggml layout .* elements differ"):
            v.check("blk.3.attn_q.weight", "ggml", expected.to(device), raw=bad, ggml_type=int(t), shape=shape)
    assert v.checked == 1


@pytest.mark.parametrize("t", [T.Q4_0, T.Q6_K, T.Q8_0, T.IQ4_XS], ids=lambda t: t.name)
def test_verifier_ggml_fields_path_catches_bad_bytes(t):
    """On the reference path the GGUF writer's check unpacks the bytes and compares every field bit for bit."""
    from qconv.formats.ggml_blocks import unpack

    raw, _, shape = layout_case(t)
    fields = unpack(raw.reshape(-1, TYPE_SIZE[t]), t)
    v = verify.Verifier("reference")
    v.check_ggml("blk.0.ffn_down.weight", fields, raw, shape)
    assert v.paths == {"reference"} and v.checked == 1
    for byte, bit in [(0, 0), (TYPE_SIZE[t] - 1, 3), (5 * TYPE_SIZE[t] + 9, 6)]:
        bad = raw.clone()
        bad[byte] ^= 1 << bit
        with pytest.raises(VerificationError, match=r"^blk\.3\.attn_q\.weight: packed ggml layout .* field .* differ"):
            v.check_ggml("blk.3.attn_q.weight", fields, bad, shape)
    assert v.checked == 1


def test_verifier_ggml_reference_path():
    raw, expected, shape = layout_case(T.IQ4_XS)
    v = verify.Verifier("reference")
    v.check("x", "ggml", expected, raw=raw, ggml_type=int(T.IQ4_XS), shape=shape)
    assert v.paths == {"reference"}


# ---------------------------------------------------------------------------------------------------------------
# qconv quantize --format gguf --verify kernel

# one GGUF type per linear of a 2-layer model: all 12 block types in one artifact
TENSOR_TYPES = [
    r"blk\.0\.attn_q=Q2_K", r"blk\.0\.attn_k=Q3_K", r"blk\.0\.attn_v=Q4_K", r"blk\.0\.attn_output=Q5_K",
    r"blk\.0\.ffn_gate=Q6_K", r"blk\.0\.ffn_up=IQ4_XS", r"blk\.0\.ffn_down=IQ4_NL", r"blk\.1\.attn_q=Q4_0",
    r"blk\.1\.attn_k=Q4_1", r"blk\.1\.attn_v=Q5_0", r"blk\.1\.attn_output=Q5_1", r"blk\.1\.ffn_.*=Q8_0",
]  # fmt: skip


@pytest.mark.triton
@needs_triton
def test_quantize_gguf_verify_kernel(cli, tmp_path, tokenizer_files, monkeypatch):
    # hidden 256: K-quant super-blocks divide every row; embeddings kept in F16 to keep the run short
    model = tiny_model(tmp_path, "llama", tokenizer_files, hidden_size=256, intermediate_size=512, head_dim=64)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CLI itself turns the interpreter on for CPU
    out = tmp_path / "m.gguf"
    overrides = [a for spec in TENSOR_TYPES for a in ("--tensor-type", spec)]
    r = cli("quantize", model, "--format", "gguf", "--no-calib", "--verify", "kernel", "--out", out, "-q",
            "--token-embedding-type", "F16", "--output-tensor-type", "F16", *overrides)  # fmt: skip
    assert r.code == 0, r.stderr
    manifest = json.loads((tmp_path / "m.gguf.qconv.json").read_text())
    assert manifest["verification"] == {"mode": "kernel", "paths": ["kernel"], "tensors": 14}
    # what landed on disk: every quantized tensor read by gguf-py dequantizes identically through the kernel
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = set()
    for info in gguf.GGUFReader(out).tensors:
        t = T(int(info.tensor_type))
        if t in (T.F16, T.F32):
            continue
        seen.add(t)
        raw = torch.from_numpy(np.ascontiguousarray(info.data).view(np.uint8).reshape(-1).copy())
        shape = tuple(int(d) for d in reversed(info.shape))
        assert same_bits(kg.dequant_triton(raw, int(t), shape), gguf_py(raw, t, shape)), info.name
    assert seen == set(WRITTEN_TYPES)

"""NF4 / FP4 with double quantization (qconv/quant/nf4.py, kernels/bnb4.py, formats/bnb.py) against bitsandbytes
itself, run on CPU: code tables, packed codes, absmax, nested absmax and offset bit-identical to
``bitsandbytes.functional.quantize_4bit``; the serialized tensors equal its QuantState.as_dict(packed=True) and
load back through QuantState.from_dict; artifacts load in transformers + bitsandbytes with logits equal to qconv's
own dequantized model."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.errors import InputError
from qconv.formats.bnb import STATE_PREFIX, kernel_args, pack_bnb4, quant_state
from qconv.kernels.bnb4 import dequant_reference, pack_nibbles, unpack_nibbles
from qconv.quant import nf4
from qconv.quant.nf4 import Bnb4Grid, quantize_weight

from conftest import tiny_model

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1345, 30, 378, 1117, 9050, 28, 327, 1090, 1382, 6372]])


def weight(out_f: int, in_f: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[0, :64] = 0  # an all-zero block
    w[1, 3] = 0.9  # an outlier
    return w.to(dtype)


def test_code_tables_are_bitsandbytes():
    assert torch.equal(nf4.code_table("nf4"), F.get_4bit_type("nf4", device="cpu"))
    fp4 = F.get_4bit_type("fp4", device="cpu")
    assert torch.equal(nf4.code_table("fp4"), fp4)  # equal values (±0 compare equal) …
    assert torch.signbit(nf4.code_table("fp4")[8])  # … with FP4's sign-only code as −0, as bnb's kernels decode it
    assert torch.equal(nf4.dynamic_map(), F.create_dynamic_map())


CASES = [
    ("nf4", 64, torch.float32, (64, 128), True),
    ("nf4", 64, torch.bfloat16, (96, 576), True),
    ("fp4", 64, torch.bfloat16, (96, 576), True),
    ("nf4", 32, torch.float16, (33, 64), True),  # odd rows
    ("fp4", 128, torch.float32, (40, 200), False),  # blocks straddle rows; partial last block
    ("nf4", 256, torch.float32, (300, 256), True),  # > 256 absmax blocks: two nested blocks
    ("nf4", 4096, torch.bfloat16, (7, 4097), True),  # odd count of values: a padded nibble
]


@pytest.mark.parametrize("qtype,blocksize,dtype,shape,dq", CASES)
def test_bit_identical_to_bitsandbytes(qtype, blocksize, dtype, shape, dq):
    w = weight(*shape, seed=blocksize, dtype=dtype)
    q_ref, s_ref = F.quantize_4bit(w, blocksize=blocksize, quant_type=qtype, compress_statistics=dq)
    qt = quantize_weight(w.float(), Bnb4Grid(qtype, blocksize, dq, dtype), name="w")
    assert torch.equal(pack_bnb4(qt)["weight"], q_ref)
    if dq:
        assert torch.equal(qt.qabsmax, s_ref.absmax)
        assert torch.equal(qt.nested_absmax, s_ref.state2.absmax)
        assert torch.equal(qt.offset, s_ref.offset)
        _, plain = F.quantize_4bit(w, blocksize=blocksize, quant_type=qtype, compress_statistics=False)
        assert torch.equal(qt.absmax, plain.absmax)
    else:
        assert torch.equal(qt.absmax, s_ref.absmax)
    # the dequantized weights: bnb's own dequantize_4bit (to the quant state's dtype)
    assert torch.equal(qt.dequantize(dtype), F.dequantize_4bit(q_ref, s_ref))
    assert qt.stats["rel_mse"] > 0


def test_nested_8bit_codes_follow_bitsandbytes_lookup_table():
    """bnb's CPU blockwise quantizer resolves values to 65536 points of [−1, 1]: near a midpoint between two map
    entries it may take the farther one. Probe exactly those bands (and ordinary values)."""
    table = nf4.dynamic_map()
    mids = (table[:-1] + table[1:]) / 2
    near = (mids.unsqueeze(1) + torch.linspace(-4e-5, 4e-5, 33).unsqueeze(0)).reshape(-1).clamp(-1, 1)
    x = torch.cat([near, torch.randn(4096), torch.zeros(256), table])
    # a leading 1.0 in every block pins the block absmax, so the probes are normalized values themselves
    blocks = nf4._blocks(x, 255)
    x = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
    ref, state = F.quantize_blockwise(x, blocksize=256)
    ours, am = nf4.quantize_blockwise_8bit(x, 256)
    assert torch.equal(ours, ref) and torch.equal(am, state.absmax)
    nearest = (x.reshape(-1, 256).unsqueeze(-1) - table).abs().argmin(-1).reshape(-1)
    assert (ours.long() != nearest).any()  # the probe does reach the bands where bnb is not nearest


@pytest.mark.parametrize("qtype,dq", [("nf4", True), ("fp4", False)])
def test_serialized_tensors_equal_bitsandbytes_state_dict(qtype, dq):
    w = weight(128, 192, seed=1, dtype=torch.bfloat16)
    q_ref, s_ref = F.quantize_4bit(w, blocksize=64, quant_type=qtype, compress_statistics=dq)
    ref = {"weight": q_ref, **{f"weight.{k}": v for k, v in s_ref.as_dict(packed=True).items()}}
    qt = quantize_weight(w.float(), Bnb4Grid(qtype, 64, dq, torch.bfloat16))
    ours = pack_bnb4(qt)
    assert set(ours) == set(ref)
    key = STATE_PREFIX + qtype
    for k in ours:
        if k != key:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    # the JSON is padded with spaces to a planned size; its content is bnb's
    assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(ref[key].tolist()))


@pytest.mark.parametrize("qtype,dq", [("nf4", True), ("fp4", True), ("nf4", False)])
def test_bitsandbytes_reads_our_tensors(qtype, dq):
    """QuantState.from_dict on our tensors → bnb's dequantize_4bit and its matmul equal our dequantization."""
    w = weight(96, 576, seed=2)
    qt = quantize_weight(w, Bnb4Grid(qtype, 64, dq, torch.bfloat16, compute_dtype=torch.float32))
    t = pack_bnb4(qt)
    qs = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in t.items() if k != "weight"}, "cpu")
    assert torch.equal(F.dequantize_4bit(t["weight"], qs), qt.dequantize(torch.bfloat16))
    x = torch.randn(5, 576)
    ref = bnb.matmul_4bit(x, t["weight"].t(), quant_state=qs)
    assert torch.equal(ref, torch.nn.functional.linear(x, qt.dequantize()))
    # our reference dequantizer (the verifier's) reads the same tensors
    state = quant_state(qt.grid, qt.shape, None if qt.offset is None else float(qt.offset))
    assert torch.equal(dequant_reference(**kernel_args(t, state)), qt.dequantize(torch.float32))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2000), seed=st.integers(0, 2**16))
def test_nibble_packing_round_trips(n, seed):
    codes = torch.randint(0, 16, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (-(-n // 2), 1)
    assert int(packed[0, 0]) >> 4 == int(codes[0])  # even element in the high nibble
    assert torch.equal(unpack_nibbles(packed, n), codes)


def test_non_finite_weight_is_input_error():
    w = weight(8, 64, seed=3)
    w[2, 5] = float("nan")
    with pytest.raises(InputError, match="layers.0.q_proj: weight holds NaN"):
        quantize_weight(w, Bnb4Grid(), name="model.layers.0.q_proj")


def test_cli_rejects_bad_combinations(cli, tokenizer_files, tmp_path):
    model = tiny_model(tmp_path, "llama", tokenizer_files)
    r = cli("quantize", model, "--method", "nf4", "--format", "safetensors", "--out", tmp_path / "a")
    assert r.code == 2 and "cannot store nf4" in r.stderr and "bnb" in r.stderr
    r = cli("quantize", model, "--method", "nf4", "--format", "bnb", "--opt", "blocksize=100", "--out", tmp_path / "b")
    assert r.code == 2 and "blocksize" in r.stderr
    r = cli("quantize", model, "--method", "rtn", "--format", "bnb", "--out", tmp_path / "c")
    assert r.code == 2 and "cannot store int" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def transformers_bnb_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """transformers + bitsandbytes (Linear4bit), everything not quantized run in float32 like qconv's runner."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    # transformers keeps the checkpoint's bf16 for the unquantized modules of a prequantized bnb model
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            for p in m.parameters(recurse=False):
                p.data = p.data.float()
    with torch.no_grad():
        return model(ids).logits.float()


def bnb_cpu_bf16() -> bool:
    """bitsandbytes' CPU backend runs 4-bit matmuls through a fused kernel that computes in bfloat16 on CPUs with
    AVX512-BF16 (bitsandbytes/backends/cpu/ops.py), elsewhere by dequantizing and a float32 matmul."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def assert_loaded_like_ours(path, ids: torch.Tensor, ours: torch.Tensor, exact_tol: float) -> None:
    """transformers + bitsandbytes load ``path``: every Linear4bit dequantizes (bnb's own dequantize_4bit, in its
    quant state's dtype) to qconv's weights bit for bit, and the logits match qconv's: to ``exact_tol`` where bnb
    computes in float32, within bf16 activation rounding (top-1 agreement ≥ 90 %, max |Δ| ≤ 3 % of the logits'
    range) where its fused bf16 kernel runs."""
    import transformers

    from qconv.model.source import open_source

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    src = open_source(str(path))
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)  # in the quant state's dtype
            assert torch.equal(w, src.read(name + ".weight").to(w.dtype)), name
            n += 1
    assert n > 0
    ref = transformers_bnb_logits(path, ids)
    if not bnb_cpu_bf16():
        torch.testing.assert_close(ref, ours, rtol=exact_tol, atol=exact_tol)
        return
    agree = (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()
    span = (ours.amax() - ours.amin()).item()
    assert agree >= 0.9, agree
    assert (ref - ours).abs().max().item() <= 0.03 * span


def qconv_logits(path, ids: torch.Tensor) -> torch.Tensor:
    from qconv.model.runner import LayerRunner, logits_fn
    from qconv.model.source import open_source

    src = open_source(str(path))
    r = LayerRunner(src)
    h = r.embed(ids)
    for i in range(src.num_layers):
        h = r.run(r.load_layer(i), i, h, 8)
    return logits_fn(r)(h)


@pytest.mark.parametrize("method,opts", [("fp4", ("blocksize=128", "double_quant=false")), ("nf4", ())])
def test_tiny_model_loads_in_transformers_bitsandbytes(cli, tokenizer_files, tmp_path, method, opts):
    model = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "bnb"
    extra = [a for o in opts for a in ("--opt", o)]
    r = cli("quantize", model, "--method", method, "--format", "bnb", "--opt", "compute_dtype=float32", *extra,
            "--out", out, "--quiet", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    import transformers

    cfg = transformers.BitsAndBytesConfig.from_dict(qc)  # the real class accepts our block
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == method and cfg.bnb_4bit_compute_dtype == torch.float32
    assert cfg.bnb_4bit_use_double_quant == ("double_quant=false" not in opts)
    ours = qconv_logits(out, IDS)
    assert_loaded_like_ours(out, IDS, ours, exact_tol=0.0)
    assert (qconv_logits(model, IDS) - ours).abs().max() > 1e-3


@pytest.mark.slow
def test_smollm2_nf4_loads_in_transformers_bitsandbytes(cli, smollm2_dithered_dir, tmp_path):
    out = tmp_path / "nf4"
    r = cli("quantize", smollm2_dithered_dir, "--method", "nf4", "--format", "bnb", "--opt", "compute_dtype=float32",
            "--out", out, "--quiet", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    summary = r.json()
    assert summary["quantized_linears"] == 30 * 7
    assert 4.1 < summary["bits_per_weight"] < 4.2  # 4 bits + 8-bit absmax per 64 + the nested blocks
    ours = qconv_logits(out, IDS)
    assert_loaded_like_ours(out, IDS, ours, exact_tol=1e-5)
    assert (qconv_logits(smollm2_dithered_dir, IDS) - ours).abs().max() > 1e-2

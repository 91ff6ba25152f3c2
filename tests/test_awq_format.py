"""`--format awq` (AutoAWQ GEMM): the packer (property test + the nibble order), golden tensors from gptqmodel's
own AWQ packing and dequantization, bad input, and end to end: SmolLM2 → qconv → transformers + gptqmodel (AWQ
torch backend), weights equal bit for bit and logits within the loader's float16 compute of qconv's own."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.formats.awq import pack_awq
from qconv.kernels.awq import AWQ_ORDER, dequant_reference, unpack_awq

from conftest import tiny_model


@pytest.fixture
def eager():
    """Run gptqmodel's torch.compile-wrapped dequantization eagerly (see test_gptq_format.eager)."""
    with torch._dynamo.config.patch(disable=True):
        yield


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_awq_pack_round_trip(rows, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 16, (rows, blocks * 8), generator=g, dtype=torch.uint8)
    packed = pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (rows, blocks)
    assert torch.equal(unpack_awq(packed, blocks * 8), values)


@pytest.mark.parametrize("column", range(8))
def test_awq_nibble_order(column):
    """Nibble k of a word holds column AWQ_ORDER[k] of its block of 8 ([0, 2, 4, 6, 1, 3, 5, 7])."""
    values = torch.zeros(1, 8, dtype=torch.uint8)
    values[0, column] = 0xF
    word = int(pack_awq(values)[0, 0]) & 0xFFFFFFFF
    assert word == 0xF << (4 * AWQ_ORDER.index(column))


@pytest.mark.slow  # importing gptqmodel alone takes ~25 s on 2 cores
def test_golden_against_gptqmodel():
    """gptqmodel's pack_awq gives the same qweight / qzeros from the same codes, and its dequantize_gemm (what the
    AWQ torch kernel runs) gives our reference rounded to float16."""
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from gptqmodel.quantization.awq.utils.packing_utils import pack_awq as their_pack

    g = torch.Generator().manual_seed(0)
    out_f, in_f, group = 48, 128, 32
    codes = torch.randint(0, 16, (in_f, out_f), generator=g, dtype=torch.int32)  # [in, out], AWQ's orientation
    zeros = torch.randint(0, 16, (in_f // group, out_f), generator=g, dtype=torch.int32)
    scales = (torch.rand(in_f // group, out_f, generator=g) * 0.1 + 0.01).half()
    qweight, qzeros = their_pack(codes, zeros, 4)
    assert torch.equal(qweight, pack_awq(codes)) and torch.equal(qzeros, pack_awq(zeros))
    theirs = dequantize_gemm(qweight, qzeros, scales, 4, group).T
    ours = dequant_reference(qweight=qweight, qzeros=qzeros, scales=scales, group_size=group)
    assert theirs.dtype == torch.float16 and torch.equal(theirs, ours.half())


def test_awq_bad_input(cli, smollm2_dithered_dir, tmp_path):
    base = ("quantize", smollm2_dithered_dir, "--out", tmp_path / "a", "--format", "awq", "-q")
    for args, needle in [
        (("--bits", "3", "--asym"), "--bits 3: --format awq (AutoAWQ GEMM) stores 4-bit weights only"),
        (("--bits", "4", "--sym"), "pass --asym"),
        (("--bits", "4", "--asym", "--group-size", "-1"), "sizes that work: 16, 32, 64"),
    ]:
        r = cli(*base, *args)
        assert r.code == 2 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_transformers_gptqmodel_loads_smollm2_awq(cli, smollm2_dithered_dir, tmp_path, eager):
    from test_ct_e2e import IDS, qconv_logits
    from test_gptq_format import assert_loader_weights_equal, quantize_and_load

    out = tmp_path / "awq"
    args = ("--format", "awq", "--bits", "4", "--group-size", "64", "--asym", "--dtype", "float32")
    summary, model = quantize_and_load(cli, smollm2_dithered_dir, out, "torch_awq", args)
    assert summary["quantized_linears"] == 30 * 7
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["version"], qc["zero_point"], qc["bits"], qc["group_size"]) == (
        "awq", "gemm", True, 4, 64)  # fmt: skip
    assert assert_loader_weights_equal(model, out, "AwqTorchLinear") == 210
    with torch.no_grad():
        ref = model(IDS).logits.float()
    ours = qconv_logits(out, IDS)
    base = qconv_logits(smollm2_dithered_dir, IDS)
    # The AWQ torch kernel multiplies in float16 (float32 activations are cast down): same weights, so the logits
    # differ only by that rounding, far below what quantization changed.
    err = (ours - ref).abs().max()
    assert err < 0.05 * (base - ours).abs().max(), float(err)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow
def test_awq_method_into_awq_format_loads(cli, tokenizer_files, tmp_path, eager):
    """--method awq (scales folded into the norms) → --format awq → transformers + gptqmodel."""
    from test_ct_e2e import IDS, qconv_logits
    from test_gptq_format import assert_loader_weights_equal, quantize_and_load

    model_dir = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "awq"
    args = ("--method", "awq", "--format", "awq", "--bits", "4", "--group-size", "32", "--asym", "--dtype",
            "float32", "--calib-samples", "8", "--calib-seqlen", "64")  # fmt: skip
    _, model = quantize_and_load(cli, model_dir, out, "torch_awq", args)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["meta"]["method"] == "awq"
    assert assert_loader_weights_equal(model, out, "AwqTorchLinear") == 14
    with torch.no_grad():
        ref = model(IDS).logits.float()
    torch.testing.assert_close(qconv_logits(out, IDS), ref, rtol=0, atol=5e-3)


@pytest.mark.slow
def test_awq_ignored_linear_stays_dense(cli, tokenizer_files, tmp_path, eager):
    """--ignore one linear of one layer: listed in modules_to_not_convert, loaded as a plain Linear."""
    from test_gptq_format import assert_loader_weights_equal, quantize_and_load

    model_dir = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "awq"
    args = ("--format", "awq", "--group-size", "32", "--asym", "--dtype", "float32", "--ignore", r"layers\.1\.mlp\.up")
    _, model = quantize_and_load(cli, model_dir, out, "torch_awq", args)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["model.layers.1.mlp.up_proj"]
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")).__name__ == "Linear"
    assert assert_loader_weights_equal(model, out, "AwqTorchLinear") == 13


@pytest.mark.slow  # four quantize runs
def test_readers_agree_across_formats(cli, tokenizer_files, tmp_path):
    """The same RTN job (float16 scales) written as compressed-tensors, GPTQ v1, GPTQ v2 and AWQ reads back, through
    each format's own reader, as the same weights: each layout holds the same codes, zero points and scales."""
    from qconv.model.source import open_source

    model_dir = tiny_model(tmp_path, "llama", tokenizer_files)
    common = ("--bits", "4", "--group-size", "32", "--asym", "--dtype", "float16", "-q")
    outs = {}
    for label, extra in {
        "ct": ("--format", "safetensors"),
        "gptq": ("--format", "gptq"),
        "gptq_v2": ("--format", "gptq", "--opt", "checkpoint_format=gptq_v2"),
        "awq": ("--format", "awq"),
    }.items():
        outs[label] = tmp_path / label
        r = cli("quantize", model_dir, "--out", outs[label], *common, *extra)
        assert r.code == 0, r.stderr
    sources = {k: open_source(str(p)) for k, p in outs.items()}
    names = [n for n in sources["ct"].names() if n.endswith("proj.weight")]
    assert len(names) == 14
    for n in names:
        ref = sources["ct"].read(n)
        assert ref.dtype == torch.float16
        for k in ("gptq", "gptq_v2", "awq"):
            assert torch.equal(sources[k].read(n), ref), (k, n)

"""`--format gptq`: packers (property tests), golden tensors from gptqmodel's own packing and loading code, the
reader's v1/v2 label check, bad input, and end to end: SmolLM2 → qconv → transformers + gptqmodel (torch backend)
with weights equal bit for bit and logits equal to qconv's own dequantized model."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.errors import InputError
from qconv.formats.gptq import pack_qweight, pack_qzeros
from qconv.kernels.gptq import dequant_reference, unpack_qweight, unpack_qzeros
from qconv.model.source import open_source

from conftest import tiny_model

BITS = (2, 3, 4, 8)


@st.composite
def codes_case(draw):
    bits = draw(st.sampled_from(BITS))
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 100))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return bits, torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)


@settings(max_examples=60, deadline=None)
@given(codes_case())
def test_qweight_round_trip(case):
    bits, codes = case  # [out, in]
    packed = pack_qweight(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (-(-codes.shape[1] * bits // 32), codes.shape[0])
    assert torch.equal(unpack_qweight(packed, bits, codes.shape[1]), codes)


@settings(max_examples=60, deadline=None)
@given(codes_case(), st.sampled_from(("gptq", "gptq_v2")))
def test_qzeros_round_trip_v1_and_v2(case, fmt):
    """Every zero point 0 … 2^bits−1 survives, v1's 0 included (stored as a borrow gptqmodel undoes)."""
    bits, zeros = case  # [G, out]
    packed = pack_qzeros(zeros, bits, fmt)
    assert packed.shape == (zeros.shape[0], -(-zeros.shape[1] * bits // 32))
    assert torch.equal(unpack_qzeros(packed, bits, zeros.shape[1], fmt), zeros)


def test_v1_stores_zeros_minus_one():
    zeros = torch.full((2, 16), 8, dtype=torch.uint8)  # 4-bit symmetric zero point
    v1 = pack_qzeros(zeros, 4, "gptq")
    v2 = pack_qzeros(zeros, 4, "gptq_v2")
    assert int(v2[0, 0]) == 0x88888888 - (1 << 32) and int(v1[0, 0]) == 0x77777777


# ---------------------------------------------------------------------------------------------------------------
# Golden tensors from gptqmodel (its packer and its torch kernel's dequantization)


@pytest.fixture(scope="module")
def gptqmodel_api():
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module

    return TorchLinear, QuantizeConfig, convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module


@pytest.mark.slow  # importing gptqmodel alone takes ~25 s on 2 cores
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, -1])
def test_golden_against_gptqmodel(gptqmodel_api, bits, group_size):
    """gptqmodel's TorchLinear.pack_original packs the same qweight / v2 qzeros from the same codes, its v2→v1
    export gives our v1 qzeros, and its torch kernel dequantizes our tensors to our reference (rounded to fp16)."""
    TorchLinear, QuantizeConfig, v1_to_v2, v2_to_v1 = gptqmodel_api
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    out_f, in_f = 64, 128
    n_groups = 1 if group_size == -1 else in_f // group_size
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 1 << bits, (out_f, n_groups), generator=g)  # includes 0 and 2^bits−1
    scales = (torch.rand(out_f, n_groups, generator=g) * 0.1 + 0.01).half().float()
    g_idx = torch.randint(0, n_groups, (in_f,), generator=g, dtype=torch.int32)  # act-order style groups
    w = (codes.float() - zeros.float()[:, g_idx.long()]) * scales[:, g_idx.long()]
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    linear.weight.data = w
    m = TorchLinear(bits=bits, group_size=group_size, sym=False, desc_act=True, in_features=in_f,
                    out_features=out_f, bias=False)  # fmt: skip
    m.pack_original(linear, scales, zeros, g_idx)
    assert torch.equal(m.qweight, pack_qweight(codes, bits))
    assert torch.equal(m.qzeros, pack_qzeros(zeros.T.contiguous(), bits, "gptq_v2"))
    v2_to_v1(m, QuantizeConfig(bits=bits))
    v1 = pack_qzeros(zeros.T.contiguous(), bits, "gptq")
    assert torch.equal(m.qzeros, v1)
    v1_to_v2(m, bits=bits, pack_dtype=torch.int32)  # what gptqmodel does when it loads a v1 checkpoint
    m.eval()
    theirs = m.dequantize_weight().T  # [out, in] fp16
    ours = dequant_reference(qweight=m.qweight, qzeros=v1, scales=m.scales, g_idx=g_idx, bits=bits,
                             checkpoint_format="gptq")  # fmt: skip
    assert theirs.dtype == torch.float16 and torch.equal(theirs, ours.half())
    assert torch.equal(ours, w)


# ---------------------------------------------------------------------------------------------------------------
# Bad input and the reader's label check


def test_gptq_bad_bits_and_options(cli, smollm2_dithered_dir, tmp_path):
    r = cli("quantize", smollm2_dithered_dir, "--out", tmp_path / "a", "--format", "gptq", "--bits", "5", "-q")
    assert r.code == 2 and "--format gptq stores 2, 3, 4 or 8 bits" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("quantize", smollm2_dithered_dir, "--out", tmp_path / "a", "--format", "gptq", "--opt",
            "checkpoint_format=gptq_v3", "-q")  # fmt: skip
    assert r.code == 2 and "gptq, gptq_v2" in r.stderr
    r = cli("quantize", smollm2_dithered_dir, "--out", tmp_path / "a", "--format", "gptq", "--group-size", "48", "-q")
    assert r.code == 2 and "group sizes -1, 16, 32" in r.stderr
    assert not (tmp_path / "a").exists()


def _relabel(path, fmt: str, key: str | None = None) -> None:
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in [key] if key else ["checkpoint_format", "format"]:
        cfg["quantization_config"][k] = fmt
    cfg_path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("written, label", [("gptq", "gptq_v2"), ("gptq_v2", "gptq")])
def test_mislabelled_checkpoint_is_refused(cli, tokenizer_files, tmp_path, written, label):
    model = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "q"
    r = cli("quantize", model, "--out", out, "--format", "gptq", "--group-size", "32", "--opt",
            f"checkpoint_format={written}", "-q")  # fmt: skip
    assert r.code == 0, r.stderr
    name = "model.layers.0.mlp.down_proj.weight"
    before = open_source(str(out)).read(name)
    _relabel(out, label)
    with pytest.raises(InputError, match=f"labelled checkpoint_format '{label}'.*mislabelled"):
        open_source(str(out)).read(name)
    r = cli("convert", out, "--out", tmp_path / "dense", "-q")
    assert r.code == 2 and "mislabelled" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    _relabel(out, written)
    assert torch.equal(open_source(str(out)).read(name), before)
    _relabel(out, label, key="format")  # checkpoint_format and format now disagree
    with pytest.raises(InputError, match="disagree"):
        open_source(str(out))


# ---------------------------------------------------------------------------------------------------------------
# End to end with the real loader


@pytest.fixture
def eager():
    """gptqmodel wraps its dequantization in torch.compile (inductor builds C++ per shape: minutes on 2 cores);
    the loaders' own code runs eagerly instead, the same arithmetic."""
    with torch._dynamo.config.patch(disable=True):
        yield


def load_with_gptqmodel(path, backend: str):
    """transformers + gptqmodel on CPU, float32 activations, the given gptqmodel kernel (``backend``)."""
    import transformers

    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    cls = transformers.GPTQConfig if qc["quant_method"] == "gptq" else transformers.AwqConfig
    qcfg = cls.from_dict({**qc, "backend": backend})
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, device_map="cpu", quantization_config=qcfg
    )


def loader_weight(module) -> torch.Tensor:
    """The weight [out, in] the loaded module computes with, by the library's own dequantization."""
    if hasattr(module, "qweight") and module.qweight.shape[0] != module.in_features:  # GPTQ: packed along in
        return module.dequantize_weight().T
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(module.qweight, module.qzeros, module.scales, module.bits, module.group_size).T


def assert_loader_weights_equal(model, path, kernel_cls: str) -> int:
    """Every quantized linear: the loader's weights equal qconv's reader's, bit for bit. Returns the count."""
    src = open_source(str(path))
    n = 0
    for module in src.modules:
        m = model.get_submodule(module)
        assert type(m).__name__ == kernel_cls, f"{module}: loaded as {type(m).__name__}"
        theirs = loader_weight(m)
        ours = src.read(module + ".weight")
        assert theirs.dtype == ours.dtype == torch.float16
        assert torch.equal(theirs, ours), module
        n += 1
    return n


def quantize_and_load(cli, model_dir, out, backend, args):
    r = cli("quantize", model_dir, "--out", out, "-q", "--json", *args)
    assert r.code == 0, r.stderr
    return r.json(), load_with_gptqmodel(out, backend)


GPTQ_CASES = {
    "v1-sym": ("--bits", "4", "--group-size", "64", "--sym"),
    "v2-asym": ("--bits", "4", "--group-size", "64", "--asym", "--opt", "checkpoint_format=gptq_v2"),
}  # asymmetric v1 (zero points 0 stored as borrows) is loaded in test_gptq_act_order_g_idx_loads


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_transformers_gptqmodel_loads_smollm2(cli, smollm2_dithered_dir, tmp_path, case, eager):
    from test_ct_e2e import IDS, qconv_logits

    out = tmp_path / "gptq"
    summary, model = quantize_and_load(cli, smollm2_dithered_dir, out, "torch", (*GPTQ_CASES[case], "--format", "gptq",
                                       "--dtype", "float32"))  # fmt: skip
    assert summary["quantized_linears"] == 30 * 7
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == json.loads((out / "config.json").read_text())["quantization_config"]
    fmt = "gptq_v2" if case.startswith("v2") else "gptq"
    assert (qc["checkpoint_format"], qc["format"], qc["bits"], qc["group_size"]) == (fmt, fmt, 4, 64)
    assert qc["sym"] == ("--sym" in GPTQ_CASES[case]) and qc["meta"]["quantizer"][0].startswith("qconv:")
    assert assert_loader_weights_equal(model, out, "TorchLinear") == 210
    with torch.no_grad():
        ref = model(IDS).logits.float()
    ours = qconv_logits(out, IDS)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (qconv_logits(smollm2_dithered_dir, IDS) - ours).abs().max() > 1e-2  # quantization changed something


@pytest.mark.slow
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_act_order_g_idx_loads(cli, tokenizer_files, tmp_path, static_groups, eager):
    """--method gptq --act-order: g_idx written (the trivial one with --static-groups), desc_act true, damp in
    meta; transformers + gptqmodel compute the same weights and logits."""
    from test_ct_e2e import IDS, qconv_logits

    model_dir = tiny_model(tmp_path, "llama", tokenizer_files)
    out = tmp_path / "gptq"
    args = ["--method", "gptq", "--act-order", "--bits", "4", "--group-size", "32", "--asym", "--dtype", "float32",
            "--calib-samples", "8", "--calib-seqlen", "64", "--format", "gptq"]  # fmt: skip
    args += ["--static-groups"] if static_groups else []
    _, model = quantize_and_load(cli, model_dir, out, "torch", args)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True and qc["static_groups"] is static_groups and qc["true_sequential"] is True
    assert qc["damp_percent"] == 0.01 and qc["meta"]["damp_percent"] == 0.01 and qc["meta"]["method"] == "gptq"
    from safetensors.torch import load_file

    g_idx = load_file(out / "model.safetensors")["model.layers.0.self_attn.q_proj.g_idx"]
    trivial = torch.arange(128, dtype=torch.int32) // 32
    assert torch.equal(g_idx, trivial) == static_groups
    assert isinstance(qc["meta"]["v1_zero_point_borrows"], int)  # asymmetric v1: zero points 0 counted
    assert assert_loader_weights_equal(model, out, "TorchLinear") == 14
    with torch.no_grad():
        ref = model(IDS).logits.float()
    torch.testing.assert_close(qconv_logits(out, IDS), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_ignored_linears_stay_dense_in_the_loader(cli, tokenizer_files, tmp_path, eager):
    """--ignore: optimum converts linears by their name inside a layer, so the same ones must be ignored in every
    layer (refused before any work otherwise); those load as plain Linear, the rest as GPTQ."""
    from test_ct_e2e import IDS, qconv_logits

    model_dir = tiny_model(tmp_path, "llama", tokenizer_files)
    base = ["--format", "gptq", "--group-size", "32", "--dtype", "float32", "-q"]
    r = cli("quantize", model_dir, "--out", tmp_path / "bad", *base, "--ignore", r"layers\.0\.mlp\.down_proj")
    assert r.code == 2 and "same linears of every layer" in r.stderr and not (tmp_path / "bad").exists()
    out = tmp_path / "q"
    _, model = quantize_and_load(cli, model_dir, out, "torch", [*base, "--ignore", r"mlp\.down_proj"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        "mlp.down_proj" not in qc["modules_in_block_to_quantize"][0] and len(qc["modules_in_block_to_quantize"][0]) == 6
    )
    assert type(model.get_submodule("model.layers.1.mlp.down_proj")).__name__ == "Linear"
    assert assert_loader_weights_equal(model, out, "TorchLinear") == 12
    with torch.no_grad():
        ref = model(IDS).logits.float()
    torch.testing.assert_close(qconv_logits(out, IDS), ref, rtol=1e-4, atol=1e-4)

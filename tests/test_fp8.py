"""FP8 E4M3 (qconv/quant/fp8.py, kernels/fp8.py, formats/ct_fp8.py, formats/fp8_block.py): scales and rounding,
saturation and NaN handling, golden vectors from compressed-tensors' own compressor and decompressor, artifacts
loaded by transformers (compressed-tensors and FineGrainedFP8 paths), transformers' own FP8 dequantization code,
and FP8 checkpoints of either layout re-quantized to GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qconv.errors import InputError
from qconv.formats.gguf_reader import GGUFFile
from qconv.kernels.fp8 import dequant_reference
from qconv.quant.fp8 import FP8_MAX, Fp8Grid, choose_scales, group_amax, quantize_weight

from conftest import tiny_model

IDS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1345, 30, 378, 1117, 9050, 28, 327, 1090, 1382, 6372]])
E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[torch.isfinite(E4M3)].unique()  # every finite E4M3 value, sorted


def weight(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[3, 7] = 1.5  # an outlier
    w[5] = 0  # an all-zero row (channel scale 1)
    return w


@settings(max_examples=30, deadline=None)
@given(
    out_f=st.integers(1, 300),
    in_f=st.integers(1, 300),
    kind=st.sampled_from(["tensor", "channel", "block"]),
    block=st.sampled_from([16, 64, 128]),
    seed=st.integers(0, 2**16),
)
def test_amax_scales_round_to_nearest_e4m3(out_f, in_f, kind, block, seed):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.1
    grid = Fp8Grid(kind, block, dtype=torch.float32)
    qt = quantize_weight(w, grid)
    assert qt.weight.dtype == torch.float8_e4m3fn and qt.scale.dtype == torch.float32
    assert tuple(qt.scale.shape) == grid.scale_shape((out_f, in_f))
    amax = group_amax(w, kind, block)
    assert torch.equal(qt.scale, torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)))
    # each code is the E4M3 value nearest to w / scale (no value exceeds ±448 with amax scales)
    x = (w / dequant_reference(torch.ones_like(w).to(torch.float8_e4m3fn), qt.scale, grid.block_size)).reshape(-1)
    nearest = (x.double().unsqueeze(1) - E4M3.double()).abs().min(dim=1).values
    assert torch.all((qt.weight.float().reshape(-1).double() - x.double()).abs() <= nearest + 1e-12)
    assert qt.stats["saturated"] == 0
    # the dequantization is one float32 product per value, rounded to the grid's dtype
    assert torch.equal(qt.dequantize(torch.float32), qt.weight.float() * dequant_reference(
        torch.ones_like(w).to(torch.float8_e4m3fn), qt.scale, grid.block_size))  # fmt: skip


def test_search_never_worse_and_saturates_explicitly():
    w = weight(64, 256, seed=1)
    w[0, :4] = torch.tensor([30.0, -0.01, 0.01, 0.02])  # one huge outlier in row 0
    for kind in ("tensor", "channel", "block"):
        plain = quantize_weight(w, Fp8Grid(kind, 64, search=False, dtype=torch.float32))
        searched = quantize_weight(w, Fp8Grid(kind, 64, search=True, dtype=torch.float32))
        err = lambda q: (q.dequantize(torch.float32) - w).square()  # noqa: E731
        assert err(searched).sum() <= err(plain).sum()
        assert torch.all(searched.scale <= plain.scale)
        # clipped values land exactly on ±448·scale, never NaN
        assert torch.isfinite(searched.weight.float()).all() and searched.weight.float().abs().max() <= FP8_MAX
    assert choose_scales(torch.zeros(4, 8), Fp8Grid("channel")).eq(1).all()  # all-zero groups: scale 1


def test_non_finite_weights_are_input_errors():
    for bad in (float("nan"), float("inf")):
        w = weight(8, 16, seed=2)
        w[1, 1] = bad
        with pytest.raises(InputError, match="model.layers.2.mlp.up_proj: weight holds 1 NaN/Inf"):
            quantize_weight(w, Fp8Grid(), name="model.layers.2.mlp.up_proj")


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
def test_compressed_tensors_compressor_golden(kind):
    """compressed-tensors' own FloatQuantizationCompressor, given our scales, produces our FP8 bytes; its
    decompressor reproduces our dequantization."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from qconv.formats.ct_fp8 import Fp8CTScheme, fp8_tensors

    w = weight(200, 320, seed=3).to(torch.bfloat16)
    grid = Fp8Grid(kind, 128, dtype=torch.bfloat16)
    qt = quantize_weight(w.float(), grid)
    weights_args, fmt, _ = Fp8CTScheme().group(grid, None, "minmax")
    assert fmt == "float-quantized"
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs.model_validate(weights_args))
    ours = fp8_tensors(qt)
    golden = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": ours["weight_scale"]}, scheme)
    assert golden["weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(golden["weight"].view(torch.uint8), ours["weight"].view(torch.uint8))
    dense = FloatQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
    assert torch.equal(dense, qt.dequantize(torch.float32))
    # and qconv's ct reader computes the same
    assert torch.equal(Fp8CTScheme().dequantize(ours, weights_args, fmt), dense)


def qconv_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """qconv's own dequantizing reader + layer-by-layer forward (float32)."""
    from qconv.model.runner import LayerRunner, logits_fn
    from qconv.model.source import open_source

    src = open_source(str(path))
    r = LayerRunner(src)
    h = r.embed(ids)
    for i in range(src.num_layers):
        h = r.run(r.load_layer(i), i, h, 8)
    return logits_fn(r)(h)


def transformers_model(path, **kwargs):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def _correlated_problem(out_f=96, in_f=256, n=2048, seed=0):
    """Correlated inputs of uneven scale (as real activations are), a weight with an outlier; H = XᵀX / n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)
    x = x @ (torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=g) / in_f**0.5)
    return x, weight(out_f, in_f, seed), x.T @ x / n


@pytest.mark.parametrize("kind", ["tensor", "channel", "block"])
@pytest.mark.parametrize("search", [False, True])
def test_gptq_fp8_lowers_layer_output_error(kind, search):
    """GPTQ onto E4M3 keeps RTN's scales and E4M3 codes, and its error feedback lowers the layer-output error."""
    from qconv.quant.gptq import GPTQConfig, gptq_fp8

    x, w, h = _correlated_problem()
    grid = Fp8Grid(kind, 64, search=search, dtype=torch.float32)
    ref = quantize_weight(w, grid)
    out_err = lambda q: float((x @ (q.dequantize(torch.float32) - w).T).square().mean())  # noqa: E731
    for act_order, bound in ((False, 0.97), (True, 0.8)):
        qt, info = gptq_fp8(w, h, grid, GPTQConfig(act_order=act_order))
        assert qt.weight.dtype == torch.float8_e4m3fn and torch.equal(qt.scale, ref.scale)
        assert torch.isfinite(qt.weight.float()).all() and qt.weight.float().abs().max() <= FP8_MAX
        assert out_err(qt) < bound * out_err(ref), (act_order, out_err(qt), out_err(ref))
        assert info.damp == 0.01 and qt.stats["gptq_damp"] == 0.01 and qt.stats["rel_mse"] > 0
    # with uncorrelated unit inputs there is nothing to feed back: exactly round-to-nearest
    qt, _ = gptq_fp8(w, torch.eye(w.shape[1]), grid, GPTQConfig())
    assert torch.equal(qt.weight.view(torch.uint8), ref.weight.view(torch.uint8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer_files):
    return tiny_model(tmp_path_factory.mktemp("tiny"), "llama", tokenizer_files)


def test_ct_fp8_loads_in_transformers(cli, tiny, tmp_path):
    import transformers
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "ct"
    r = cli("quantize", tiny, "--method", "fp8", "--dtype", "float32", "--out", out, "--quiet", "--json")
    assert r.code == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    g = QuantizationConfig.model_validate(qc).config_groups["group_0"]
    assert (g.weights.type, g.weights.strategy, g.input_activations.dynamic) == ("float", "channel", True)
    ours = qconv_logits(out, IDS)
    # weights decompressed at load: exactly qconv's model
    dq = transformers_model(out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(logits(dq), ours, rtol=0, atol=0)
    # the default path keeps FP8 weights and quantizes activations per token: close, not equal
    fp8 = transformers_model(out)
    assert fp8.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert (logits(fp8) - ours).abs().max() < 0.2
    assert (qconv_logits(tiny, IDS) - ours).abs().max() > 1e-4


def test_ct_fp8_gptq_loads_in_transformers(cli, tiny, tmp_path):
    """--opt fp8_gptq: calibrated GPTQ onto E4M3, the same float-quantized layout, decompressed by transformers to
    exactly qconv's weights, and different from plain rounding."""
    import transformers
    from safetensors.torch import load_file

    calib = ("--calib-samples", "4", "--calib-seqlen", "64", "--dtype", "float32", "--quiet")
    out, plain = tmp_path / "gptq", tmp_path / "plain"
    r = cli("quantize", tiny, "--method", "fp8", "--opt", "fp8_gptq=true", "--act-order", "--damp", "0.02", *calib,
            "--out", out)  # fmt: skip
    assert r.code == 0, r.stderr
    assert cli("quantize", tiny, "--method", "fp8", *calib, "--out", plain).code == 0
    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["tensors"]["model.layers.0.mlp.down_proj.weight"]["gptq_damp"] == 0.02
    a, b = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj"
    assert torch.equal(a[f"{name}.weight_scale"], b[f"{name}.weight_scale"])  # RTN's scales, other codes
    assert not torch.equal(a[f"{name}.weight"].view(torch.uint8), b[f"{name}.weight"].view(torch.uint8))
    dq = transformers_model(out, quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    torch.testing.assert_close(logits(dq), qconv_logits(out, IDS), rtol=0, atol=0)


def test_ct_fp8_static_activation_scales(cli, tiny, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "static"
    opts = ("--opt", "activations=static", "--opt", "fp8_scale=block", "--opt", "fp8_block=64")
    calib = ("--calib-samples", "4", "--calib-seqlen", "64")
    r = cli("quantize", tiny, "--method", "fp8", *opts, *calib, "--out", out, "--quiet", "--json")
    assert r.code == 0, r.stderr
    t = load_file(out / "model.safetensors")
    s = t["model.layers.1.self_attn.o_proj.input_scale"]
    assert s.dtype == torch.float32 and s.shape == (1,) and 0 < float(s) < 1
    manifest = json.loads((out / "qconv.json").read_text())
    amax = manifest["tensors"]["model.layers.1.self_attn.o_proj.weight"]["input_amax"]
    assert float(s) == pytest.approx(amax / FP8_MAX, rel=1e-6)
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (2, 4)  # [128/64, 256/64] blocks
    g = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert g["input_activations"]["dynamic"] is False and g["weights"]["block_structure"] == [64, 64]
    fp8 = transformers_model(out)  # runs with static input scales
    assert torch.isfinite(logits(fp8)).all()


def test_fp8_block_loads_in_transformers(cli, tiny, tmp_path):
    out = tmp_path / "blk"
    r = cli("quantize", tiny, "--method", "fp8", "--format", "fp8", "--dtype", "float32", "--out", out, "--quiet")
    assert r.code == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    import transformers

    transformers.FineGrainedFP8Config(**{k: v for k, v in qc.items() if k not in ("quant_method", "fmt")})
    # no GPU: transformers dequantizes the FP8 blocks at load (its Fp8Dequantize), in the model's float32
    model = transformers_model(out)
    torch.testing.assert_close(logits(model), qconv_logits(out, IDS), rtol=0, atol=0)


def test_cli_rejects_fp8_misuse(cli, tiny, tmp_path):
    cases = [
        (("--format", "fp8", "--opt", "fp8_scale=channel"), "fp8_scale=channel"),
        (("--format", "fp8", "--opt", "activations=static"), "activations=static"),
        (("--opt", "activations=static", "--no-calib"), "calibration"),
        (("--format", "bnb",), "cannot store fp8"),
        (("--opt", "fp8_scale=rows",), "fp8_scale"),
        (("--act-order",), "fp8_gptq=true"),
        (("--opt", "fp8_gptq=true", "--static-groups", "--act-order"), "--static-groups"),
        (("--opt", "fp8_gptq=true", "--no-calib"), "calibration"),
    ]  # fmt: skip
    for i, (args, msg) in enumerate(cases):
        r = cli("quantize", tiny, "--method", "fp8", *args, "--out", tmp_path / f"o{i}")
        assert r.code == 2 and msg in r.stderr, (args, r.stderr)
        assert not (tmp_path / f"o{i}").exists()


def gguf_tensors(path) -> dict[str, torch.Tensor]:
    f = GGUFFile(path)
    return {n: f.read_raw(n) for n in f.tensors}


@pytest.mark.slow  # four CLI runs, two writing GGUF vocabularies of 49k tokens
@pytest.mark.parametrize("fmt", ["safetensors", "fp8"])
def test_fp8_checkpoint_requantizes_to_gguf(cli, tiny, tmp_path, fmt):
    """An FP8 checkpoint (either layout) is dequantized on read: GGUF Q8_0 of it equals GGUF Q8_0 of its dense
    conversion, tensor for tensor."""
    art = tmp_path / "fp8"
    r = cli("quantize", tiny, "--method", "fp8", "--format", fmt, "--dtype", "float32", "--out", art, "--quiet")
    assert r.code == 0, r.stderr
    r = cli("quantize", art, "--format", "gguf", "--gguf-type", "Q8_0", "--out", tmp_path / "a.gguf", "--quiet")
    assert r.code == 0, r.stderr
    r = cli("convert", art, "--dtype", "float32", "--out", tmp_path / "dense", "--quiet")
    assert r.code == 0, r.stderr
    r = cli("quantize", tmp_path / "dense", "--format", "gguf", "--gguf-type", "Q8_0", "--out", tmp_path / "b.gguf",
            "--quiet")  # fmt: skip
    assert r.code == 0, r.stderr
    a, b = gguf_tensors(tmp_path / "a.gguf"), gguf_tensors(tmp_path / "b.gguf")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the dense conversion holds exactly the FP8 values × scales
    from safetensors.torch import load_file

    packed = load_file(art / "model.safetensors")
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    name = "model.layers.1.mlp.gate_proj"
    scale = packed[f"{name}.weight_scale" if fmt == "safetensors" else f"{name}.weight_scale_inv"]
    block = (128, 128) if fmt == "fp8" else None
    assert torch.equal(dense[f"{name}.weight"], dequant_reference(packed[f"{name}.weight"], scale, block))


@pytest.mark.slow
def test_smollm2_fp8_block_matches_transformers_dequantization(cli, smollm2_dithered_dir, tmp_path):
    """SmolLM2's 576-wide linears are not multiples of 128: transformers' load-time Fp8Dequantize rejects such
    shapes on CPU (it derives the block from shape // scale grid), its GPU kernels and vLLM take ceil blocks.
    Every linear is checked against transformers' own ceil-block dequantization (_dequantize_fp8_weight)."""
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    out = tmp_path / "blk"
    r = cli("quantize", smollm2_dithered_dir, "--method", "fp8", "--format", "fp8", "--dtype", "float32", "--out", out,
            "--quiet", "--json")  # fmt: skip
    assert r.code == 0, r.stderr
    t = load_file(out / "model.safetensors")
    from qconv.model.source import open_source

    src = open_source(str(out))
    modules = [n.removesuffix(".weight_scale_inv") for n in t if n.endswith(".weight_scale_inv")]
    assert len(modules) == 210
    for m in modules:
        ref = _dequantize_fp8_weight(t[f"{m}.weight"], t[f"{m}.weight_scale_inv"], [128, 128], torch.float32)
        assert torch.equal(src.read(f"{m}.weight"), ref), m

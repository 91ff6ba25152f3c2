"""qconv's GGUF type plan equals llama.cpp's own: llama_model_quantize is run on synthetic models and the type
and order of every tensor it writes is compared with formats.gguf_mix.plan_types."""

from __future__ import annotations

import pytest

from qconv.errors import InputError
from qconv.formats.ggml_blocks import GGMLType as T
from qconv.formats.gguf_mix import FILE_TYPES, MixOptions, ModelShape, file_type, llama_order, plan_types
from qconv.formats.gguf_reader import GGUFFile

from llamacpp import quantize, synthetic_f16_gguf

MODELS = {
    # name: (synthetic kwargs, ModelShape)
    "gqa4-untied-16L": (dict(n_layer=16, n_head=8, n_head_kv=2), ModelShape("llama", 16, 8, 2)),
    "mha-tied-12L": (dict(n_layer=12, n_head=8, n_head_kv=8, tied=True), ModelShape("llama", 12, 8, 8)),
    "odd-width-9L": (
        dict(n_layer=9, n_embd=320, n_head=10, n_head_kv=5, n_ff=520, tied=True),
        ModelShape("llama", 9, 10, 5),
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for name, (kw, shape) in MODELS.items():
        path = root / f"{name}.gguf"
        out[name] = (path, synthetic_f16_gguf(path, **kw), shape)
    return out


def llama_cpp_types(src, tmp_path, ftype: int, **kw) -> tuple[list[str], dict[str, T]]:
    out = tmp_path / "q.gguf"
    quantize(src, out, ftype, **kw)
    g = GGUFFile(out)
    return list(g.tensors), {n: T(t.ggml_type) for n, t in g.tensors.items()}


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("ftype", [f for f in FILE_TYPES if f not in ("F32", "BF16")])
def test_types_match_llama_quantize(models, tmp_path, model, ftype):
    src, shapes, shape = models[model]
    _, fid, _ = file_type(ftype)
    order, theirs = llama_cpp_types(src, tmp_path, fid)
    ours = plan_types(shapes, ftype, shape)
    assert ours.order == order == llama_order(list(shapes))
    assert {n: t for n, t in ours.types.items()} == theirs


@pytest.mark.parametrize(
    "opts,kw",
    [
        (MixOptions(pure=True), dict(pure=True)),
        (MixOptions(output_type=T.Q8_0, token_embedding_type=T.Q4_K),
         dict(output_type=T.Q8_0, token_embedding_type=T.Q4_K)),
        (MixOptions(overrides=(("attn_q", T.Q8_0), ("ffn_down", T.Q4_0))),
         dict(overrides=(("attn_q", T.Q8_0), ("ffn_down", T.Q4_0)))),
    ],
    ids=["pure", "output-and-embedding-types", "tensor-type-overrides"],
)  # fmt: skip
@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q2_K"])
def test_options_match_llama_quantize(models, tmp_path, opts, kw, ftype):
    src, shapes, shape = models["gqa4-untied-16L"]
    _, fid, _ = file_type(ftype)
    _, theirs = llama_cpp_types(src, tmp_path, fid, **kw)
    assert plan_types(shapes, ftype, shape, opts).types == theirs


@pytest.mark.parametrize("ftype", ["Q4_0", "Q5_0", "IQ4_XS", "IQ4_NL"])
def test_imatrix_dependent_rules(models, tmp_path, ftype):
    """With an imatrix, llama.cpp gives Q4_0/Q5_0 files' first ffn_down layers Q4_1/Q5_1 and IQ4 ones none."""
    src, shapes, shape = models["gqa4-untied-16L"]
    imatrix = {n: [1.0] * s[-1] for n, s in shapes.items() if len(s) == 2 and n.startswith("blk.")}
    _, fid, _ = file_type(ftype)
    _, theirs = llama_cpp_types(src, tmp_path, fid, imatrix=imatrix)
    assert plan_types(shapes, ftype, shape, MixOptions(has_imatrix=True)).types == theirs


def test_70b_and_fallback_rules():
    shapes = {"token_embd.weight": (256, 576), "output_norm.weight": (576,)}
    for i in range(80):
        shapes[f"blk.{i}.attn_v.weight"] = (128, 512)
        shapes[f"blk.{i}.ffn_down.weight"] = (512, 1536)
    plan = plan_types(shapes, "Q3_K_M", ModelShape("llama", 80, 64, 8))
    # 70B: attn_v Q4_K → Q5_K
    assert plan.types["blk.10.attn_v.weight"] == T.Q5_K
    # tied embedding of row 576: Q6_K does not fit 256-blocks → Q8_0
    assert plan.types["token_embd.weight"] == T.Q8_0
    plan = plan_types({"blk.0.ffn_up.weight": (64, 576)}, "Q4_K_M", ModelShape("llama", 1, 1, 1))
    assert plan.types["blk.0.ffn_up.weight"] == T.Q5_0 and "576" in plan.notes["blk.0.ffn_up.weight"]


def test_unknown_type_is_input_error():
    with pytest.raises(InputError, match="--gguf-type Q7_K: unknown"):
        file_type("Q7_K")
    assert file_type("q4_k")[0] == "Q4_K_M"

"""`qconv eval`: perplexity as llama-perplexity computes it, KL divergence and top-1 agreement vs the base."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qconv.eval import evaluate

pytestmark = pytest.mark.slow

CHUNKS = 20


@pytest.fixture(scope="module")
def base_eval(smollm2_dithered_dir, wikitext_test):
    return evaluate(str(smollm2_dithered_dir), str(smollm2_dithered_dir), str(wikitext_test), CHUNKS, 512)


def test_base_ppl_finite_stable_and_matches_transformers(base_eval, smollm2_dithered_dir, wikitext_test):
    r = base_eval
    assert math.isfinite(r["ppl"]) and 5 < r["ppl"] < 200
    assert r["kld_mean"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1_agreement"] == 1.0
    assert r["chunks"] == CHUNKS and r["tokens_scored"] == CHUNKS * 255
    # the second run reads the cached base states and must give the same figures
    again = evaluate(str(smollm2_dithered_dir), str(smollm2_dithered_dir), str(wikitext_test), CHUNKS, 512)
    assert again["ppl"] == r["ppl"] and again["base_ppl"] == r["base_ppl"]

    # independent computation: transformers' full model over the same chunks, second half of each scored
    import transformers

    from qconv.calibration import add_bos

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dithered_dir))
    assert not add_bos(tok)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dithered_dir), dtype=torch.float32)
    ids = tok(wikitext_test.read_text(), add_special_tokens=False).input_ids  # SmolLM2 adds no BOS
    chunks = torch.tensor(ids[: CHUNKS * 512]).reshape(CHUNKS, 512)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, CHUNKS, 5):
            logits = model(chunks[b : b + 5]).logits.float()
            lp = F.log_softmax(logits[:, 256:511], -1)
            tgt = chunks[b : b + 5, 257:]
            nll -= float(lp.gather(2, tgt[..., None]).sum())
            n += tgt.numel()
    assert r["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_kld_orders_bit_widths(cli, base_eval, smollm2_dithered_dir, wikitext_test, tmp_path):
    results = {}
    for bits in (4, 3):
        out = tmp_path / f"w{bits}"
        r = cli("quantize", smollm2_dithered_dir, "--bits", bits, "--group-size", 64, "--asym", "--out", out, "-q")
        assert r.code == 0, r.stderr
        ev = cli(
            "eval", out, "--base", smollm2_dithered_dir, "--text", wikitext_test, "--chunks", CHUNKS, "--json", "-q"
        )
        assert ev.code == 0, ev.stderr
        results[bits] = ev.json()
    assert results[4]["base_ppl"] == pytest.approx(base_eval["ppl"], rel=1e-6)
    assert 0 < results[4]["kld_mean"] < results[3]["kld_mean"]
    assert results[4]["ppl"] < results[3]["ppl"]
    assert results[3]["top1_agreement"] < results[4]["top1_agreement"] < 1


def test_quantize_eval_flag_records_figures(cli, smollm2_dithered_dir, tmp_path):
    out = tmp_path / "w8"
    r = cli("quantize", smollm2_dithered_dir, "--bits", 8, "--group-size", -1, "--out", out, "--eval",
            "--eval-chunks", 4, "--json", "-q")  # fmt: skip
    assert r.code == 0, r.stderr
    ev = r.json()["eval"]
    assert ev["chunks"] == 4 and ev["text"]["source"] == "qconv-default-eval"
    assert 0 <= ev["kld_mean"] < 0.01  # 8-bit per channel is nearly lossless
    import json

    manifest = json.loads((out / "qconv.json").read_text())
    assert manifest["eval"]["kld_mean"] == ev["kld_mean"]
    assert "mean KL divergence" in (out / "README.md").read_text()

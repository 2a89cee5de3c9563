"""gearfx on the real model (SmolLM2-135M-Instruct, fetched from PyPI), CPU-sized."""

import math
from pathlib import Path

import pytest
import torch

import gearfx
from gearfx import evaluate as ev
from gearfx import models

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw_test.txt"


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2-135m")


def test_fp16_recipe_reproduces_hf_greedy_tokens(smollm2):
    model, tok = smollm2
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=16, do_sample=False, cache_implementation="static")
    gm = gearfx.compile(model, "fp16", max_cache_len=64, batch_size=1, backend_compile=False)
    got = gm.generate(ids, max_new_tokens=16)
    assert torch.equal(got, want)
    assert " Paris" in tok.decode(got[0, ids.shape[1]:])


@pytest.fixture(scope="module")
def scored(smollm2):
    """fp16 and compressed recipes scored on 96 tokens after a 160-token prefill."""
    model, tok = smollm2
    ids = ev.read_tokens(tok, TEXT, 256)
    decoder = gearfx.capture(model, max_cache_len=256, batch_size=1)
    compiled = ev.compile_all(lambda r: gearfx.compile(decoder, r, backend_compile=False),
                              ["kivi-4bit", "gear-4bit", "gear-2bit", "lossless", "balanced", "compact",
                               "gear-4bit-h2o"])
    return ids, {r.recipe: r for r in ev.evaluate(compiled, ids, prefill=160, progress=False)}


def test_fp16_eval_reproduces_the_uncompressed_forward_pass(smollm2, scored):
    model, _ = smollm2
    ids, results = scored
    with torch.no_grad():
        logp = model(ids).logits[0, 159:-1].log_softmax(-1)
    ppl = math.exp(-logp.gather(-1, ids[0, 160:, None]).mean().item())
    assert abs(results["fp16"].ppl / ppl - 1) < 1e-4
    assert results["fp16"].kl < 1e-6 and results["fp16"].top1_agreement == 1.0


def test_compressed_recipes_stay_within_bounds(scored):
    _, r = scored
    for name in ("kivi-4bit", "gear-4bit"):
        assert abs(r[name].ppl_delta_pct) < 5.0 and r[name].kl < 0.05 and r[name].top1_agreement > 0.85, r[name]
    assert r["gear-2bit"].kl < 0.5 and r["gear-2bit"].kl > r["gear-4bit"].kl
    # measured on this slice: lossless KL 0.0031 (+1.71%), balanced 0.0030 (+1.40%), gear-4bit
    # 0.0011, kivi-4bit 0.0037, compact 0.0160 (+2.01%). lossless and balanced are tuned on the
    # 4096-token protocol (KL 0.0018 and 0.0026 there); on this 256-token slice the 4-bit keys / 3-bit values
    # they share in layers 0-14 cost more than the uniform 5/4 bits lossless had before (KL 0.0005
    # here, 0.0022 on 256 tokens after a 512-token prefill).
    for name in ("lossless", "balanced"):
        assert abs(r[name].ppl_delta_pct) < 2.0 and r[name].kl < min(0.004, r["kivi-4bit"].kl), r[name]
    assert r["gear-4bit"].kl < r["kivi-4bit"].kl, (r["gear-4bit"], r["kivi-4bit"])
    assert abs(r["compact"].ppl_delta_pct) < 8.0 and r["compact"].kl < 0.025, r["compact"]
    # eviction from the prefill on: 140 of 256 slots. Measured +23.8% / KL 0.152 (top-1 85%) at 0.253x,
    # a third of it the 16-token full-precision window (+28.8% / 0.174 at 0.190x without it, decay
    # 0.999); scoring prompt tokens by H2O's sum alone (h2o.observe 0) it was +9.7% / 0.133, but that
    # evicts a pass key before the question asks for it: continuing text and retrieval want
    # different tokens kept
    h2o = r["gear-4bit-h2o"]
    assert abs(h2o.ppl_delta_pct) < 30.0 and h2o.kl < 0.18 and h2o.kv_bytes_ratio < 0.26, h2o
    # an fp32 model's uncompressed cache is twice an fp16 one; even at this small capacity, where
    # the fp16 window is up to half of it, a compressed cache is smaller than an fp16 one
    assert r["fp16"].kv_bytes_ratio == 2.0
    assert all(r[n].kv_bytes_ratio < 1.0
               for n in ("kivi-4bit", "gear-4bit", "gear-2bit", "lossless", "balanced", "compact"))


def test_eval_text_errors(smollm2, tmp_path):
    _, tok = smollm2
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ev.read_tokens(tok, tmp_path / "missing.txt", 10)
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(ValueError, match="tokens; 100 were asked for"):
        ev.read_tokens(tok, short, 100)


def test_memory_targets_at_4096_tokens(smollm2):
    """The compiled real model's allocated state (sink buffers included) against an fp16 cache."""
    model, _ = smollm2
    decoder = gearfx.capture(model, max_cache_len=4096, batch_size=1)
    reports = {name: gearfx.compile(decoder, name, backend_compile=False).memory_report()
               for name in ("lossless", "balanced", "compact", "gear-4bit", "gear-2bit")}
    ratio = {name: r.ratio for name, r in reports.items()}
    assert ratio["lossless"] <= 0.33 and ratio["compact"] <= 0.22, ratio
    assert ratio["balanced"] <= 0.30, ratio
    assert ratio["gear-4bit"] <= 0.35 and ratio["gear-2bit"] <= 0.26, ratio
    assert reports["lossless"].components["sink.key"] == 30 * 3 * 4 * 64 * 2  # fp16, 4 tokens, 30 layers

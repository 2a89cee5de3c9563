"""gearfx.compile end to end on tiny decoders: exactness of the fp16 recipe, padding, compression
tolerance, compile stability, memory accounting, errors."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import gearfx
from gearfx.compress.layout import cache_bytes
from gearfx.passes import UnsupportedGraphError
from gearfx.recipes import parse_recipe
from tests import tiny

PROMPT_LEN, NEW = 9, 12


def padded_batch(batch=2, seed=0):
    """Left-padded prompts of different lengths (row i has i * 2 pad tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (batch, PROMPT_LEN), generator=g)
    mask = torch.ones(batch, PROMPT_LEN, dtype=torch.long)
    for i in range(batch):
        ids[i, : 2 * i], mask[i, : 2 * i] = 0, 0
    return ids, mask


def hf_greedy(model, ids, mask, new=NEW):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         cache_implementation="static", pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_fp16_recipe_reproduces_hf_greedy_tokens_with_left_padding(family):
    model = tiny.hf(family)
    ids, mask = padded_batch()
    gm = gearfx.compile(model, "fp16", max_cache_len=64, batch_size=2, backend_compile=False)
    assert torch.equal(gm.generate(ids, mask, max_new_tokens=NEW)[:, PROMPT_LEN:], hf_greedy(model, ids, mask))


@pytest.mark.parametrize("attn", ["eager"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_attention_models_are_rewritten_too(family, attn):
    model = tiny.hf(family, attn)
    ids, mask = padded_batch()
    gm = gearfx.compile(model, "fp16", max_cache_len=64, batch_size=2, backend_compile=False)
    assert torch.equal(gm.generate(ids, mask, max_new_tokens=NEW)[:, PROMPT_LEN:], hf_greedy(model, ids, mask))
    gear = gearfx.compile(model, "gear-4bit", max_cache_len=64, batch_size=2, backend_compile=False)
    assert gear.generate(ids, mask, max_new_tokens=NEW).shape == (2, PROMPT_LEN + NEW)


def test_compiled_generation_is_exact_and_never_recompiles():
    model = tiny.hf("llama")
    ids, mask = padded_batch()
    gm = gearfx.compile(model, "gear-4bit", max_cache_len=128, batch_size=2)
    eager = gearfx.compile(model, "gear-4bit", max_cache_len=128, batch_size=2, backend_compile=False)
    # compiles the prefill and decode graphs and kernels, and the decode kernel that closes a chunk
    gm.generate(ids, mask, max_new_tokens=60)  # 9 + 60 tokens: the window (64) fills once
    counters.clear()
    ids, mask = ids[:, :7], mask[:, :7]  # a shorter prompt (a view), padded as before: no new kernels
    out = gm.generate(ids, mask, max_new_tokens=80)  # crosses chunk boundaries
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])  # nothing new compiled
    assert torch.equal(out, eager.generate(ids, mask, max_new_tokens=80))


def test_one_part_in_full_precision_compiles_and_matches_eager():
    """Keys kept at 16 bits, values quantized: the chunk close passes the key window through as is
    (which a torch.cond branch must not alias: it once failed to compile)."""
    recipe = parse_recipe({"name": "k16-v4", "window": 16, "key": {"bits": 16},
                                  "value": {"bits": 4, "axis": "token", "group": 16}})
    model = tiny.hf("llama")
    ids, mask = padded_batch()
    gm = gearfx.compile(model, recipe, max_cache_len=64, batch_size=2)
    eager = gearfx.compile(model, recipe, max_cache_len=64, batch_size=2, backend_compile=False)
    assert torch.equal(gm.generate(ids, mask, max_new_tokens=30), eager.generate(ids, mask, max_new_tokens=30))


# 8-token chunks: the prefill closes chunk 0, and the sinks of the row with 6 pads (positions 6-9)
# straddle chunks 0 and 1
SMALL_CHUNKS = parse_recipe({"name": "small-chunks", "window": 8, "sinks": 4,
                             "key": {"bits": 2, "axis": "channel", "group": 8, "rank": 1, "outliers": 0.02},
                             "value": {"bits": 2, "axis": "token", "group": 16, "outliers": 0.02}})


# a budget of 6 tokens, so the longer prompts (9 and 7 tokens) are cut at the prefill; decayed
# scores weigh each query by its distance from the prompt's end, which padding must not shift
OBSERVING_H2O = parse_recipe({"name": "h2o-observing", "key": {"bits": 16}, "value": {"bits": 16},
                              "h2o": {"heavy": 3, "recent": 2, "sinks": 1, "observe": 4, "decay": 0.9}})


# measured: gear-4bit <= 0.0142, SMALL_CHUNKS (2-bit, 8-token chunks) <= 0.104
@pytest.mark.parametrize("recipe, tol", [("fp16", 0.0), ("gear-4bit", 0.03), (SMALL_CHUNKS, 0.15), ("h2o", 0.0),
                                         (OBSERVING_H2O, 0.0)])
def test_padded_batch_rows_match_each_prompt_alone(recipe, tol):
    """Four prompts of different lengths, left-padded, against each prompt run alone."""
    model = tiny.hf("qwen2")
    ids, mask = padded_batch(batch=4, seed=1)
    batched = gearfx.compile(model, recipe, max_cache_len=96, batch_size=4, backend_compile=False)
    single = gearfx.compile(model, recipe, max_cache_len=96, batch_size=1, backend_compile=False)
    steps = 70
    logits_b = [batched.prefill(ids, mask)[:, -1]]
    for _ in range(steps):
        logits_b.append(batched.decode(logits_b[-1].argmax(-1, keepdim=True))[:, -1])
    for row in range(4):
        real = ids[row : row + 1, mask[row].bool()]
        logits_s = [single.prefill(real)[:, -1]]
        for i in range(steps):
            logits_s.append(single.decode(logits_b[i][row : row + 1].argmax(-1, keepdim=True))[:, -1])
        a, b = torch.stack([x[row] for x in logits_b]), torch.cat(logits_s)
        if tol == 0.0:
            assert torch.equal(a.argmax(-1), b.argmax(-1))
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        else:  # compression of differently placed chunks: close, not equal
            assert ((a - b).norm() / b.norm()).item() < tol


@pytest.mark.parametrize("family, recipe", [("qwen2", "gear-4bit"), ("qwen2", SMALL_CHUNKS),
                                            ("gemma3", SMALL_CHUNKS), ("qwen2", "gear-4bit-h2o"),
                                            ("qwen2", OBSERVING_H2O)])
def test_padding_never_reaches_the_real_tokens(family, recipe):
    """The same left-padded batch with other token ids as padding: the real tokens' logits are the
    same through prefill and 70 decode steps, chunk closes included. Padding is left out of
    quantization ranges, outliers and low-rank fits, and sinks are each row's first real tokens,
    also where a sliding window (gemma3: 16 tokens) hides them from late queries, so the
    padding's keys cannot reach the compressed cache."""
    model = tiny.hf(family)
    ids, mask = padded_batch(batch=4, seed=1)
    other = torch.where(mask.bool(), ids, torch.randint(1, 256, ids.shape, generator=torch.Generator().manual_seed(2)))
    gm = gearfx.compile(model, recipe, max_cache_len=96, batch_size=4, backend_compile=False)
    want = [gm.prefill(ids, mask)]
    tokens = []
    for _ in range(70):  # then both decode this run's greedy tokens
        tokens.append(want[-1][:, -1:].argmax(-1))
        want.append(gm.decode(tokens[-1]))
    got = [gm.prefill(other, mask)] + [gm.decode(t) for t in tokens]
    real = mask.bool()
    torch.testing.assert_close(got[0][real], want[0][real], atol=1e-5, rtol=0)
    for x, y in zip(got[1:], want[1:]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_a_captured_decoder_compiles_each_recipe_as_the_model_does():
    model = tiny.hf("llama")
    ids, _ = padded_batch(batch=1)
    # at 144 tokens gear-4bit closes 2 chunks and gear-4bit-h2o evicts about 55 times
    decoder = gearfx.capture(model, max_cache_len=144, batch_size=1)
    names = ("fp16", "gear-4bit", "gear-4bit-h2o")
    shared = [gearfx.compile(decoder, r, backend_compile=False) for r in names]  # stepped in lockstep
    alone = [gearfx.compile(model, r, max_cache_len=144, batch_size=1, backend_compile=False) for r in names]
    tok = ids[:, -1:]
    for step in range(144 - PROMPT_LEN):
        for a, b in zip(shared, alone):
            got, want = (a.prefill(ids), b.prefill(ids)) if step == 0 else (a.decode(tok), b.decode(tok))
            assert torch.equal(got, want), (a.recipe.name, step)
        tok = got[:, -1:].argmax(-1)
    assert "key_cache_0" in decoder.program.constants  # the captured program is left as it was
    with pytest.raises(ValueError, match="max_cache_len=64, but the decoder was captured with max_cache_len=144"):
        gearfx.compile(decoder, "fp16", max_cache_len=64)


def test_capture_releases_the_static_cache_it_traced(monkeypatch):
    """Dynamo keeps the traced module (and so its StaticCache) alive after a strict export; the
    capture frees that cache's memory and leaves zeros of its shape that take none."""
    from gearfx.capture import HFDecoder

    traced = []
    init = HFDecoder.__init__
    monkeypatch.setattr(HFDecoder, "__init__", lambda self, *a: (init(self, *a), traced.append(self))[0])
    decoder = gearfx.capture(tiny.hf("llama"), max_cache_len=96, batch_size=2)
    (module,) = traced
    for i in range(2):
        assert module.get_buffer(f"key_cache_{i}").untyped_storage().nbytes() == 0
        kept = decoder.program.constants[f"value_cache_{i}"]
        assert kept.shape == (2, 2, 96, 64) and kept.stride() == (0, 0, 0, 0) and not kept.any()


def test_last_logits_only_computes_the_same_last_logits():
    """A decoder captured with last_logits_only (HF's logits_to_keep=1) returns [B, 1, V] from a
    prefill, equal to the last position of the full logits, and the same steps after it."""
    model = tiny.hf("llama")
    ids, mask = padded_batch()
    full = gearfx.compile(gearfx.capture(model, max_cache_len=96, batch_size=2), "gear-4bit", backend_compile=False)
    last = gearfx.compile(gearfx.capture(model, max_cache_len=96, batch_size=2, last_logits_only=True), "gear-4bit",
                          backend_compile=False)
    want, got = full.prefill(ids, mask), last.prefill(ids, mask)
    assert got.shape == (2, 1, 256) and want.shape == (2, PROMPT_LEN, 256)
    torch.testing.assert_close(got, want[:, -1:])
    tok = want[:, -1:].argmax(-1)
    for _ in range(70):  # through a chunk close (window 64)
        want, got = full.decode(tok), last.decode(tok)
        torch.testing.assert_close(got, want)
        tok = want.argmax(-1)
    with pytest.raises(ValueError, match="last_logits_only needs a transformers model"):
        gearfx.capture(tiny.GptFast(), last_logits_only=True)


def test_gear_4bit_logits_stay_close_to_fp16():
    model = tiny.hf("llama")
    ids, _ = padded_batch(batch=1)
    decoder = gearfx.capture(model, max_cache_len=160, batch_size=1)
    fp = gearfx.compile(decoder, "fp16", backend_compile=False)
    errs = {}
    for name in ("kivi-4bit", "gear-4bit", "gear-2bit"):
        gm = gearfx.compile(decoder, name, backend_compile=False)
        a, b = [fp.prefill(ids)[:, -1]], [gm.prefill(ids)[:, -1]]
        for _ in range(140):
            tok = a[-1].argmax(-1, keepdim=True)
            a.append(fp.decode(tok)[:, -1])
            b.append(gm.decode(tok)[:, -1])
        errs[name] = (torch.stack(b) - torch.stack(a)).norm().item() / torch.stack(a).norm().item()
    assert errs["gear-4bit"] < 0.05 and errs["kivi-4bit"] < 0.05
    assert errs["gear-2bit"] < 0.3


def test_plain_module_with_buffers_gpt_fast_style():
    for write in ("index_put", "index_copy"):
        model = tiny.GptFast(write=write)
        ids = torch.randint(0, 256, (2, PROMPT_LEN))
        ref_model = copy.deepcopy(model)
        with torch.no_grad():  # the module's own greedy loop is the reference
            logits = ref_model(ids, torch.arange(PROMPT_LEN))[:, -1]
            want = []
            for p in range(PROMPT_LEN, PROMPT_LEN + NEW):
                want.append(logits.argmax(-1))
                logits = ref_model(want[-1][:, None], torch.tensor([p]))[:, -1]
        gm = gearfx.compile(model, "fp16", backend_compile=False)
        assert torch.equal(gm.generate(ids, max_new_tokens=NEW)[:, PROMPT_LEN:], torch.stack(want, 1))
        assert gearfx.compile(model, "gear-4bit", backend_compile=False).generate(ids, max_new_tokens=NEW).shape == (2, PROMPT_LEN + NEW)


def test_unsupported_cache_read_names_the_node():
    with pytest.raises(UnsupportedGraphError, match=r"node 'mean.*' .* reads the KV cache"):
        gearfx.compile(tiny.ReadsCacheOddly(), "gear-4bit", backend_compile=False)


def test_memory_report_is_the_allocated_state():
    model = tiny.hf("llama")
    for name in ("fp16", "gear-4bit", "gear-2bit", "gear-4bit-h2o"):
        gm = gearfx.compile(model, name, max_cache_len=256, batch_size=2, backend_compile=False)
        report = gm.memory_report()
        state = [b for n, b in gm.program.constants.items() if n.startswith("gearfx_")]
        assert report.total == sum(b.numel() * b.element_size() for b in state)
        expected = cache_bytes(gm.recipe, num_layers=2, batch=2, heads=2, head_dim=64, capacity=256, dtype=torch.float32)
        assert report.components == expected
        assert "key_cache_0" not in gm.program.constants  # the fp cache is gone
        assert report.recipe in str(report)


def test_layer_overrides_apply_per_layer():
    recipe = gearfx.recipes.parse_recipe({"name": "mixed", "window": 64,
                                          "key": {"bits": 4, "group": 64}, "value": {"bits": 4, "axis": "token", "group": 64},
                                          "layers": {0: {"key": {"bits": 16}, "value": {"bits": 16}}}})
    gm = gearfx.compile(tiny.hf("llama"), recipe, max_cache_len=128, batch_size=1, backend_compile=False)
    names = set(gm.program.constants)
    assert "gearfx_0_key_data" in names and "gearfx_0_key_codes" not in names
    assert "gearfx_1_key_codes" in names


def test_sampling_is_seeded():
    gm = gearfx.compile(tiny.hf("llama"), "gear-4bit", max_cache_len=64, batch_size=2, backend_compile=False)
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9)
    a = gm.generate(ids, mask, seed=0, **kw)
    assert torch.equal(a, gm.generate(ids, mask, seed=0, **kw))
    assert not torch.equal(a, gm.generate(ids, mask, seed=1, **kw))
    with pytest.raises(ValueError, match="temperature > 0"):
        gm.generate(ids, mask, max_new_tokens=2, do_sample=True, temperature=0.0)


def test_cache_overflow_is_an_error():
    gm = gearfx.compile(tiny.hf("llama"), "kivi-4bit", max_cache_len=32, batch_size=2, backend_compile=False)
    ids, mask = padded_batch()
    with pytest.raises(gearfx.CacheOverflowError, match="max_cache_len=32"):
        gm.generate(ids, mask, max_new_tokens=30)
    gm.prefill(ids, mask)
    for _ in range(32 - PROMPT_LEN):
        gm.decode(ids[:, :1])
    with pytest.raises(gearfx.CacheOverflowError, match="cache full"):
        gm.decode(ids[:, :1])


def test_wrong_batch_size_is_an_error():
    gm = gearfx.compile(tiny.hf("llama"), "fp16", max_cache_len=32, batch_size=2, backend_compile=False)
    with pytest.raises(ValueError, match="batch_size=2"):
        gm.prefill(torch.zeros(3, 4, dtype=torch.long))


def test_export_returns_the_rewritten_program_which_decomposes():
    ep = gearfx.export(tiny.hf("llama"), "gear-4bit", max_cache_len=64, batch_size=1)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("gearfx.attend.default") == 2
    assert not any("scaled_dot_product" in t for t in targets)
    inlined = ep.run_decompositions({})  # what export pipelines do: the op becomes aten ops
    assert not any("gearfx" in str(n.target) for n in inlined.graph.nodes if n.op == "call_function")
    ids = torch.randint(0, 256, (1, 5))
    args = dict(input_ids=ids, attention_mask=torch.ones(1, 64, dtype=torch.long),
                position_ids=torch.arange(5)[None], cache_position=torch.arange(5))
    with torch.no_grad():
        torch.testing.assert_close(inlined.module()(**args), ep.module()(**args))

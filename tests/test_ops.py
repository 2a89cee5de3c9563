"""The attention op's algebra: corrections applied in factored form equal attention over the
reconstructed keys/values (the identity a fused kernel relies on)."""

import pytest
import torch

from gearfx.compress import gear, quantize
from gearfx.ops.reference import FIELDS, _chunk, _corrections
from gearfx.recipes import TensorSpec


@pytest.mark.parametrize("rank, outliers", [(2, 0.02), (1, 0.0), (0, 0.03)])
@pytest.mark.parametrize("axis, c, d", [("channel", 16, 64), ("token", 16, 64), ("channel", 16, 48),
                                         ("token", 1, 64), ("token", 1, 48)])
def test_factored_corrections_equal_reconstruction(rank, outliers, axis, c, d):
    """c = 1: one token per chunk (H2O's slots, outliers summed per slot); d = 48: a head_dim
    whose outlier indices split by division, not by shift and mask."""
    g = torch.Generator().manual_seed(0)
    b, h, n, groups, length = 2, 2, 3, 3, 2
    x = torch.randn(b, h, n, c, d, generator=g)
    x[..., 5] = x[..., 5] * 20 + 4
    spec = TensorSpec(4, axis, 16, rank=rank, outliers=outliers)
    chunk = gear.compress(x, spec, 3, seed=0)
    state = {f"key.{f}": t for f, t in chunk._asdict().items() if t is not None}
    assert set(state) <= {f"key.{f}" for f in FIELDS}
    stored = _chunk(state, "key")
    deq = quantize.dequantize(stored.codes, stored.scale, stored.minimum, spec.bits, spec.axis, spec.group)
    fix = _corrections(stored, spec)
    rebuilt = gear.decompress(chunk, spec, torch.float32).reshape(b, h, n * c, d)
    q = torch.randn(b, h, groups, length, d, generator=g)
    probs = torch.rand(b, h, groups, length, n * c, generator=g)
    torch.testing.assert_close(q @ deq.reshape(b, h, 1, n * c, d).mT + fix.scores(q),
                               q @ rebuilt[:, :, None].mT, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(probs @ deq.reshape(b, h, 1, n * c, d) + fix.output(probs),
                               probs @ rebuilt[:, :, None], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["fp16", "gear-4bit", "gear-4bit-h2o"])
@pytest.mark.parametrize("length", [1, 5])
def test_attend_kernel_fake_matches_real(recipe, length):
    """opcheck: schema, fake (meta) kernel vs real outputs, with q a transposed view as in models."""
    import gearfx
    from gearfx.compress.layout import allocate
    from gearfx.ops import SiteConfig

    b, h, hq, d, capacity = 1, 2, 4, 64, 128
    cfg = SiteConfig(gearfx.load_recipe(recipe), capacity)
    state = list(allocate(cfg.layout(b, h, d, torch.float32)).values())
    q = torch.randn(b, length, hq, d).transpose(1, 2)
    k, v = torch.randn(b, h, length, d), torch.randn(b, h, length, d)
    mask = torch.ones(b, 1, length, capacity, dtype=torch.bool)
    args = (q, k, v, torch.arange(length), mask, 0.125, cfg.to_json(), state)
    torch.library.opcheck(torch.ops.gearfx.attend_kernel.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_h2o_window_tokens_are_attended_exactly():
    """A compressing H2O cache attends its `window` newest tokens from full precision: with every
    token in the window (and none evicted) a 2-bit cache attends like the exact one (to fp16
    rounding), and with a
    shorter window it does not."""
    from gearfx.compress.layout import allocate, cache_layout
    from gearfx.ops import reference
    from gearfx.recipes import parse_recipe

    b, h, d, capacity, prompt = 1, 2, 32, 24, 16
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(b, h, capacity, d, generator=g), torch.randn(b, h, capacity, d, generator=g)
    q = torch.randn(b, h, capacity, d, generator=g)
    outs = {}
    for window in (capacity, 4):
        recipe = parse_recipe({"name": "w", "window": window, "key": {"bits": 2, "axis": "token", "group": 32},
                               "value": {"bits": 2, "axis": "token", "group": 32},
                               "h2o": {"heavy": 0, "recent": capacity, "sinks": 0}})
        state = allocate(cache_layout(recipe, b, h, d, capacity, torch.float32))
        reference.attend(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], torch.arange(prompt), None, 0.25,
                         recipe, capacity, state)
        outs[window] = torch.cat([reference.attend(q[:, :, p:p + 1], k[:, :, p:p + 1], v[:, :, p:p + 1],
                                                   torch.tensor([p]), None, 0.25, recipe, capacity, state)
                                  for p in range(prompt, capacity)], dim=2)
    causal = torch.ones(capacity, capacity, dtype=torch.bool).tril()[prompt:]
    exact = torch.nn.functional.scaled_dot_product_attention(q[:, :, prompt:], k.half().float(), v.half().float(),
                                                             attn_mask=causal, scale=0.25)
    torch.testing.assert_close(outs[capacity], exact, rtol=0, atol=1e-3)  # the newest token is not rounded
    assert (outs[4] - exact).abs().max() > 0.05  # 2-bit codes outside the window


@pytest.mark.parametrize("additive", [False, True])
def test_fp16_prefill_gqa_is_sdpa_over_repeated_kv(additive):
    """The uncompressed cache's prefill attends 3 query heads per KV head without repeating the
    cache per query head, and gets exactly SDPA over the repeated cache (left padding included):
    a sequence's first tokens over themselves only, later ones over the whole cache."""
    import gearfx
    from gearfx.compress.layout import allocate, cache_layout
    from gearfx.ops import reference

    b, h, g, d, capacity = 2, 2, 3, 64, 96
    recipe = gearfx.load_recipe("fp16")
    state = allocate(cache_layout(recipe, b, h, d, capacity, torch.float32))
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h * g, capacity, d, generator=gen)
    k, v = torch.randn(b, h, capacity, d, generator=gen), torch.randn(b, h, capacity, d, generator=gen)
    allowed = torch.ones(capacity, capacity, dtype=torch.bool).tril().repeat(b, 1, 1, 1)
    allowed[1, :, :, :5] = False  # the second row's 5 pad tokens
    mask = torch.zeros(()).masked_fill(~allowed, torch.finfo(torch.float32).min) if additive else allowed
    for start, end in ((0, 40), (40, 70)):  # a prompt, then more of it over the cache
        pos = torch.arange(start, end)
        got = reference.attend(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], pos, mask[:, :, start:end],
                               0.125, recipe, capacity, state)
        keys = end if start == 0 else capacity
        cached = [torch.cat([x[:, :, :end], x.new_zeros(b, h, keys - end, d)], dim=2) for x in (k, v)]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], *(x.repeat_interleave(g, dim=1) for x in cached),
            attn_mask=mask[:, :, start:end, :keys], scale=0.125)
        assert torch.equal(got, want)


@pytest.mark.parametrize("recipe", ["gear-4bit", "lossless"])
def test_prefill_compresses_only_the_chunks_it_reaches(recipe, monkeypatch):
    """A prefill compresses the window's chunk and those its tokens reach, not the whole store,
    and a sequence's first prefill decompresses nothing; the chunks past them may hold an earlier
    sequence's codes, and a new sequence's outputs are the same as on a fresh cache, through
    decode steps that close chunks and a prefill that continues the sequence."""
    import gearfx
    from gearfx.compress.layout import allocate, cache_layout, slots
    from gearfx.ops import reference

    recipe = gearfx.load_recipe(recipe)
    b, h, hq, d, capacity, prompt = 1, 2, 4, 64, 1024, 100
    n, c = slots(recipe, capacity)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    used = allocate(cache_layout(recipe, b, h, d, capacity, torch.float32))
    reference.attend(rnd(b, hq, 900, d), rnd(b, h, 900, d), rnd(b, h, 900, d), torch.arange(900), None, 0.125,
                     recipe, capacity, used)  # an earlier, longer sequence
    fresh = allocate(cache_layout(recipe, b, h, d, capacity, torch.float32))
    compressed = []
    real = reference.compress_chunk
    monkeypatch.setattr(reference, "compress_chunk", lambda x, *a: compressed.append(x.shape[2]) or real(x, *a))
    decompressed = []
    unpack = reference.gear.decompress
    monkeypatch.setattr(reference.gear, "decompress", lambda *a: decompressed.append(1) or unpack(*a))
    q, k, v = rnd(b, hq, prompt, d), rnd(b, h, prompt, d), rnd(b, h, prompt, d)
    outs = [reference.attend(q, k, v, torch.arange(prompt), None, 0.125, recipe, capacity, s) for s in (used, fresh)]
    assert compressed == [prompt // c + 2] * 4 and prompt // c + 2 < n  # keys and values, each cache
    assert decompressed == []
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    end = 2 * c + 5
    for position in range(prompt, end):  # closes the chunks the prompt did not fill
        q, k, v = rnd(b, hq, 1, d), rnd(b, h, 1, d), rnd(b, h, 1, d)
        outs = [reference.attend(q, k, v, torch.tensor([position]), None, 0.125, recipe, capacity, s)
                for s in (used, fresh)]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    q, k, v = rnd(b, hq, 30, d), rnd(b, h, 30, d), rnd(b, h, 30, d)
    outs = [reference.attend(q, k, v, torch.arange(end, end + 30), None, 0.125, recipe, capacity, s)
            for s in (used, fresh)]
    assert decompressed == [1] * 4  # a continuation reads the stored chunks
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["fp16", "gear-4bit", "gear-4bit-h2o"])
@pytest.mark.parametrize("additive", [False, True])
def test_plain_causal_prefill_skips_the_mask_and_changes_nothing(recipe, additive, monkeypatch):
    """A sequence's first prefill under a plain causal mask attends with SDPA's is_causal (no
    mask built); outputs and states are bit for bit those of the masked path, through decode
    steps. Padding, or a continuation, keeps the mask."""
    import gearfx
    from gearfx.compress.layout import allocate, cache_layout
    from gearfx.ops import reference

    recipe = gearfx.load_recipe(recipe)
    b, h, hq, d, capacity, prompt = 2, 2, 6, 64, 256, 150
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    allowed = torch.ones(b, 1, capacity, capacity, dtype=torch.bool).tril()
    mask = torch.zeros(()).masked_fill(~allowed, torch.finfo(torch.float32).min) if additive else allowed
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(*args, is_causal=False, **kwargs):
        calls.append(is_causal)
        return sdpa(*args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(reference.F, "scaled_dot_product_attention", recorded)
    q, k, v = rnd(b, hq, prompt, d), rnd(b, h, prompt, d), rnd(b, h, prompt, d)
    steps = [(rnd(b, hq, 1, d), rnd(b, h, 1, d), rnd(b, h, 1, d)) for _ in range(70)]
    runs = []
    for plain in (True, False):
        monkeypatch.setattr(reference, "plain_causal", (lambda m, n: False) if not plain else reference.plain_causal)
        state = allocate(cache_layout(recipe, b, h, d, capacity, torch.float32))
        outs = [reference.attend(q, k, v, torch.arange(prompt), mask[:, :, :prompt], 0.125, recipe, capacity, state)]
        if recipe.h2o is None:  # H2O's prefill computes its own probabilities
            assert calls and all(calls) == plain
        calls.clear()
        for i, (qs, ks, vs) in enumerate(steps):
            p = prompt + i
            outs.append(reference.attend(qs, ks, vs, torch.tensor([p]), mask[:, :, p:p + 1], 0.125, recipe, capacity,
                                         state))
        runs.append((outs, state))
    for x, y in zip(runs[0][0], runs[1][0]):
        assert torch.equal(x, y)
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    padded = allowed.clone()
    padded[1, :, :, :3] = False
    assert not reference.plain_causal(padded[:, :, :prompt], prompt)
    assert not reference.plain_causal(allowed[:, :, :prompt] & ~allowed[:, :, :prompt].tril(-64), prompt)  # window
    assert not reference.plain_causal(allowed[:, :, :1], prompt)  # one row, broadcast over the queries


def test_real_tokens_reads_each_mask_dtype():
    """Padding is found in bool masks and in additive masks of any dtype: an fp16 mask's masked
    entries (-65504) are far above fp32's minimum."""
    from gearfx.ops.reference import real_tokens

    allowed = torch.ones(2, 1, 8, 8, dtype=torch.bool).tril()
    allowed[1, :, :, :3] = False
    want = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        additive = torch.zeros((), dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        assert torch.equal(real_tokens(additive, torch.arange(8)), want)
    assert torch.equal(real_tokens(allowed, torch.arange(8)), want)
    assert real_tokens(None, torch.arange(8)).all()


def test_site_kernel_recompiles_when_its_arguments_change():
    """The compiled decode kernel keeps dynamo's guards on its arguments only (`ops._argument_guards`):
    one site config called with another scale or batch size still matches the reference."""
    import gearfx
    from gearfx.compress.layout import allocate, cache_layout
    from gearfx.ops import reference

    recipe = gearfx.load_recipe("kivi-4bit")
    h, hq, d, capacity, prompt = 2, 4, 64, 256, 140
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    config = gearfx.ops.SiteConfig(recipe, capacity).to_json()
    for b, scale in ((1, 0.125), (1, 0.3), (2, 0.3)):
        state = allocate(cache_layout(recipe, b, h, d, capacity, torch.float32))
        reference.attend(rnd(b, hq, prompt, d), rnd(b, h, prompt, d), rnd(b, h, prompt, d), torch.arange(prompt),
                         None, scale, recipe, capacity, state)
        copy = {n: t.clone() for n, t in state.items()}
        q, k, v, at = rnd(b, hq, 1, d), rnd(b, h, 1, d), rnd(b, h, 1, d), torch.tensor([prompt])
        out = torch.ops.gearfx.attend_kernel(q, k, v, at, None, scale, config, list(state.values()))
        want = reference.attend(q, k, v, at, None, scale, recipe, capacity, copy)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recipe", ["kivi-4bit", "gear-4bit"])
def test_site_kernels_compress_as_the_reference_does(recipe):
    """The compiled kernels of each kind (prefill from 0, a later prefill, decode, the decode step
    that closes a chunk) leave the state the reference leaves: Inductor rounds where eager does
    (`emulate_precision_casts`), so the codes are the same bytes. Without it ~0.1% of the code
    bytes moved by one step, and the low-rank factors fitted on those residuals moved further."""
    import gearfx
    from gearfx.compress.layout import allocate, cache_layout
    from gearfx.ops import SiteConfig, reference

    recipe = gearfx.load_recipe(recipe)
    b, h, hq, d, capacity = 1, 2, 4, 64, 256
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    config = SiteConfig(recipe, capacity).to_json()
    state = allocate(cache_layout(recipe, b, h, d, capacity, torch.float32))
    copy = {n: t.clone() for n, t in state.items()}
    position = 0
    for length in [100, 57] + [1] * 36:  # the decode steps close chunk 2 (positions 128-191)
        q, k, v = rnd(b, hq, length, d), rnd(b, h, length, d), rnd(b, h, length, d)
        at = torch.arange(position, position + length)
        out = torch.ops.gearfx.attend_kernel(q, k, v, at, None, 0.125, config, list(state.values()))
        want = reference.attend(q, k, v, at, None, 0.125, recipe, capacity, copy)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
        position += length
    for name, t in state.items():
        if name.endswith((".a", ".b")):  # the power iteration's sums, in another order: an ulp
            torch.testing.assert_close(t, copy[name], rtol=1e-3, atol=1e-3, msg=name)
        else:
            assert torch.equal(t, copy[name]), name

"""Decode attention over the compressed cache at issue 5's CPU shape, against fp32 SDPA.

Groups "attention ctx=8192" (32 heads: issue 5's shape) and "attention ctx=8192 32q/8kv" (GQA, 4
query heads per KV head, as Llama 3 8B): one layer's decode step, B=1, head_dim 128, an 8192-token
cache, fp32 queries, one thread. "sdpa" is `F.scaled_dot_product_attention` over an uncompressed
fp32 cache of that length; each compressing recipe runs `gearfx::attend_kernel`, the op the
compiled model calls (Inductor's kernel over the packed codes, `ops/codes.py`), on a cache whose
chunks hold random keys and values compressed as the cache compresses them. `time_vs_sdpa` in
`extra_info` is the recipe's median over SDPA's of the same shape, measured in the same run (the
target: <= 1).
Eviction recipes are left out: filling their slots needs a prefill, and an 8192-token H2O
prefill holds 8192 x 8192 probabilities per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gearfx
from gearfx.compress.layout import allocate, slots
from gearfx.ops import SiteConfig, reference

CONTEXT, HEADS, HEAD_DIM = 8192, 32, 128
KV_HEADS = {"": 32, " 32q/8kv": 8}  # group suffix -> KV heads
BASELINE = "sdpa"
_sdpa_median: dict[int, float] = {}  # KV heads -> SDPA's median, set by the baseline case, which runs first


def pytest_generate_tests(metafunc):
    s = metafunc.config.gearfx_settings
    chunked = [r for r in s.recipes if gearfx.load_recipe(r).compresses and gearfx.load_recipe(r).h2o is None]
    cases = [(suffix, r) for suffix in KV_HEADS for r in [BASELINE] + chunked]
    metafunc.parametrize("attention_case", cases, ids=[f"{r}-{KV_HEADS[x]}kv" for x, r in cases])


def _compressed_state(recipe: gearfx.Recipe, kv_heads: int,
                      gen: torch.Generator) -> tuple[SiteConfig, list[torch.Tensor], int]:
    """(the site config, its state tensors with every chunk before the window compressed and the
    window half full, the position of the next token)."""
    cfg = SiteConfig(recipe, CONTEXT)
    named = allocate(cfg.layout(1, kv_heads, HEAD_DIM, torch.float32))
    n, c = slots(recipe, CONTEXT)
    for part in ("key", "value"):
        x = torch.randn(1, kv_heads, n, c, HEAD_DIM, generator=gen)
        x[..., :4] *= 8  # a few large channels, as real keys have
        fields = reference.compress_chunk(x.half(), getattr(recipe, part), recipe)
        for f, t in fields.items():
            named[f"{part}.{f}"].copy_(t)
        named[f"window.{part}"].copy_(x[:, :, -1].half())
    return cfg, list(named.values()), (n - 1) * c + c // 2


def test_attention(benchmark, attention_case, request):
    suffix, recipe = attention_case
    kv_heads = KV_HEADS[suffix]
    rounds = request.config.gearfx_settings.decode_rounds
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, generator=gen)
    benchmark.group = f"attention ctx={CONTEXT}{suffix}"
    info = benchmark.extra_info
    info.update(kind="attention", recipe=recipe, context=CONTEXT, heads=HEADS, kv_heads=kv_heads,
                head_dim=HEAD_DIM, threads=torch.get_num_threads())
    if recipe == BASELINE:
        k, v = (torch.randn(1, kv_heads, CONTEXT, HEAD_DIM, generator=gen) for _ in range(2))
        mask = torch.ones(1, 1, 1, CONTEXT, dtype=torch.bool)
        benchmark.pedantic(F.scaled_dot_product_attention, args=(q, k, v, mask),
                           kwargs=dict(enable_gqa=kv_heads < HEADS), rounds=rounds, warmup_rounds=2, iterations=1)
        _sdpa_median[kv_heads] = benchmark.stats.stats.median
        return
    cfg, state, position = _compressed_state(gearfx.load_recipe(recipe), kv_heads, gen)
    k, v = (torch.randn(1, kv_heads, 1, HEAD_DIM, generator=gen) for _ in range(2))
    mask = (torch.arange(CONTEXT) <= position)[None, None, None]
    args = (q, k, v, torch.tensor([position]), mask, HEAD_DIM ** -0.5, cfg.to_json(), state)
    # the same position every round: the step rewrites one window slot and closes no chunk
    benchmark.pedantic(torch.ops.gearfx.attend_kernel, args=args, rounds=rounds, warmup_rounds=2, iterations=1)
    if kv_heads in _sdpa_median:
        info["time_vs_sdpa"] = benchmark.stats.stats.median / _sdpa_median[kv_heads]

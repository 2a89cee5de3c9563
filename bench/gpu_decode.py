"""Decode attention over the compressed cache on a GPU, against fp16 SDPA on the same shapes.

    python bench/gpu_decode.py --json out.json

For each shape and recipe: the Triton kernel's time (`triton_decode.attention`, one layer, every
chunk but the window compressed), fp16 SDPA's time over an uncompressed cache of the same length,
the byte floor (every state byte the kernel reads, at the copy bandwidth measured in the same run),
and the cost of closing a chunk (compressing a full window, eagerly, as the kernel's decode step
does) amortised over its tokens as a fraction of the decode step. Before timing, the kernel is
checked against the reference op. The JSON is rewritten after every row, so a run cut short by
a lent machine's time limit still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

import gearfx
from gearfx.compress.layout import allocate, cache_layout
from gearfx.ops import reference, triton_decode

SHAPES = [  # (label, batch, query heads, KV heads, head_dim, context)
    ("B=8 H=32 D=128 16k", 8, 32, 32, 128, 16384),
    ("B=32 32q/8kv D=128 16k", 32, 32, 8, 128, 16384),
    ("B=8 H=32 D=128 4k", 8, 32, 32, 128, 4096),
]
RECIPES = ["gear-4bit", "gear-2bit", "kivi-4bit", "kivi-2bit", "gear-4bit-h2o"]


def _time(fn) -> float:
    """Median milliseconds of fn on the GPU."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes/s, counting bytes read and written."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _time(lambda: y.copy_(x))
    return 2 * x.numel() / (ms / 1e3)


def _fill(state: dict[str, torch.Tensor], head_dim: int, gen: torch.Generator) -> None:
    """Random contents of the right kind: codes, scales, factors, sorted outlier indices, and every
    H2O slot holding a distinct position."""
    for name, t in state.items():
        if name == "h2o.positions":
            t.copy_(torch.arange(t.shape[-1], device=t.device, dtype=t.dtype).expand_as(t))
        elif name.endswith("codes"):
            t.copy_(torch.randint(0, 256, t.shape, generator=gen, device=t.device, dtype=torch.uint8))
        elif name.endswith("outlier_index"):
            entries = state[name.replace("outlier_index", "codes")].shape[-2] * head_dim
            idx = torch.rand(*t.shape[:-1], entries, generator=gen, device=t.device).topk(t.shape[-1]).indices
            t.copy_(idx.sort(-1).values.to(t.dtype))
        elif t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=gen, device=t.device, dtype=torch.float32).to(t.dtype) * 0.1)


def check(recipe_name: str, dtype: torch.dtype) -> float:
    """Max |kernel - reference| over a few decode steps on a small case (after a prefill). bf16 is
    checked here only: the Triton interpreter that runs the kernel in CI has no bf16 arithmetic."""
    recipe = gearfx.load_recipe(recipe_name)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, groups, d, capacity, prompt = 2, 4, 4, 128, 512, 300
    state = allocate(cache_layout(recipe, b, h, d, capacity, dtype), "cuda")
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=dtype)  # noqa: E731
    keys = rnd(b, h, prompt, d)
    keys[..., 7] = keys[..., 7] * 8 + 4
    reference.attend(rnd(b, h * groups, prompt, d), keys, rnd(b, h, prompt, d), torch.arange(prompt, device="cuda"),
                     None, d ** -0.5, recipe, capacity, state)
    mine = {n: t.clone() for n, t in state.items()}
    worst = 0.0
    for position in range(prompt, prompt + 24):  # crosses a chunk close (at 319 for window 64)
        q, k, v = rnd(b, h * groups, 1, d), rnd(b, h, 1, d), rnd(b, h, 1, d)
        cache_position = torch.tensor([position], device="cuda")
        want = reference.attend(q, k, v, cache_position, None, d ** -0.5, recipe, capacity, state)
        got = triton_decode.decode(q, k, v, cache_position, None, d ** -0.5, recipe, capacity, mine)
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst


def bench(label, b, hq, h, d, ctx, recipe_name, bandwidth) -> dict:
    recipe = gearfx.load_recipe(recipe_name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    capacity = ctx
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.float16)
    k1, v1 = torch.randn(2, b, h, 1, d, device="cuda", dtype=torch.float16)
    kc = torch.randn(b, h, ctx, d, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    sdpa = _time(lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=hq != h))
    fp16_bytes = 2 * kc.numel() * 2
    del kc, vc
    state = allocate(cache_layout(recipe, b, h, d, capacity, torch.float16), "cuda")
    _fill(state, d, gen)
    cache_position = torch.tensor([ctx - 1], device="cuda")
    run = lambda: triton_decode.attention(q, state, recipe, capacity, cache_position, None, d ** -0.5, k1, v1)  # noqa: E731
    kernel = _time(run)
    state_bytes = sum(t.numel() * t.element_size() for t in state.values())
    floor = state_bytes / bandwidth * 1e3
    row = dict(shape=label, recipe=recipe_name, kernel_ms=kernel, sdpa_fp16_ms=sdpa, speedup=sdpa / kernel,
               byte_floor_ms=floor, vs_floor=kernel / floor, state_bytes=state_bytes,
               bytes_ratio=state_bytes / fp16_bytes)
    if recipe.h2o is None and label == SHAPES[0][0]:  # closing a chunk, amortised over the chunk's tokens, vs this decode step
        window = state["window.key"]
        close = lambda: [reference.compress_chunk(window, s, recipe) for s in (recipe.key, recipe.value)]  # noqa: E731
        close_ms = _time(close)
        row.update(close_ms=close_ms, close_amortised_pct=100 * close_ms / recipe.window / kernel)
    del state
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    props = torch.cuda.get_device_properties(0)
    meta = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version())
    start = time.perf_counter()
    errors = {f"{r} {str(t).removeprefix('torch.')}": check(r, t)
              for r in ("gear-4bit", "gear-2bit", "gear-4bit-h2o") for t in (torch.float16, torch.bfloat16)}
    print("max |kernel - reference| (24 decode steps):", errors, flush=True)
    bandwidth = _bandwidth()
    print(f"{meta}  copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, bandwidth_bytes_per_s=bandwidth, check_max_abs_error=errors, rows=rows),
                          f, indent=1)

    save()
    for shape in SHAPES:
        for recipe in recipes:
            print(f"{time.perf_counter() - start:.0f} s: {shape[0]} {recipe}", flush=True)
            row = bench(*shape, recipe, bandwidth)
            rows.append(row)
            print(f"{row['shape']:<24} {recipe:<14} kernel {row['kernel_ms']:.3f} ms  sdpa {row['sdpa_fp16_ms']:.3f} ms  "
                  f"x{row['speedup']:.2f}  floor {row['byte_floor_ms']:.3f} ms ({row['vs_floor']:.2f}x)  "
                  f"bytes {row['bytes_ratio']:.3f}" + (f"  close {row['close_amortised_pct']:.1f}%" if 'close_ms' in row else ""),
                  flush=True)
            save()


if __name__ == "__main__":
    main()

"""Decode attention over the compressed cache on a GPU, against fp16 SDPA on the same shapes.

    python bench/gpu_decode.py --json out.json

For each shape and recipe: the Triton kernel's time (`triton_decode.attention`, one layer, every
chunk but the window compressed), fp16 SDPA's time over an uncompressed cache of the same length,
the byte floor (every state byte the kernel reads, at the copy bandwidth measured in the same run),
and the cost of closing a chunk (compressing a full window, eagerly, as the kernel's decode step
does) amortised over its tokens as a fraction of the decode step. Before timing, the kernel is
checked against the reference op. Last, where its time goes: at the first shape, the decode kernel
alone (not the merge of its splits) is timed again with each correction it applies switched off
(key/value outliers, key/value factors), so that a GPU says what each costs where bench/gpu_sass.py
can only count instructions. The JSON is rewritten after every row, so a run cut short by a lent
machine's time limit still reports what it measured.
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
# each correction of the decode kernel and the constants that switch it off (its output is then
# wrong: for timing only); value outliers are added from the logits the loop stores for them
TERMS = {
    "key outliers": dict(K_OUT=0),
    "value outliers": dict(V_OUT=0, STORE_LOGITS=False),
    "key factors": dict(K_RANK=0),
    "value factors": dict(V_RANK=0),
}


def terms(constants: dict) -> dict:
    """The TERMS a launch with these constants applies (its first constant is the term's count of
    outliers or rank)."""
    return {term: off for term, off in TERMS.items() if constants[next(iter(off))]}


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


def check(recipe_name: str, dtype: torch.dtype, device: str = "cuda", b: int = 2, h: int = 4, groups: int = 4,
          d: int = 128, capacity: int = 512, prompt: int = 300, steps: int = 24) -> float:
    """Max |kernel - reference| over `steps` decode steps after a `prompt`-token prefill (b rows, h
    KV heads of `groups` query heads, head_dim d; by default the steps cross a chunk close, at 319
    for window 64). bf16 is checked here only: the Triton interpreter that runs the kernel in CI
    has no bf16 arithmetic."""
    recipe = gearfx.load_recipe(recipe_name)
    g = torch.Generator(device=device).manual_seed(0)
    state = allocate(cache_layout(recipe, b, h, d, capacity, dtype), device)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    keys = rnd(b, h, prompt, d)
    keys[..., 7] = keys[..., 7] * 8 + 4
    reference.attend(rnd(b, h * groups, prompt, d), keys, rnd(b, h, prompt, d), torch.arange(prompt, device=device),
                     None, d ** -0.5, recipe, capacity, state)
    mine = {n: t.clone() for n, t in state.items()}
    worst = 0.0
    for position in range(prompt, prompt + steps):
        q, k, v = rnd(b, h * groups, 1, d), rnd(b, h, 1, d), rnd(b, h, 1, d)
        cache_position = torch.tensor([position], device=device)
        want = reference.attend(q, k, v, cache_position, None, d ** -0.5, recipe, capacity, state)
        got = triton_decode.decode(q, k, v, cache_position, None, d ** -0.5, recipe, capacity, mine)
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    return worst


def _cache(b, hq, h, d, ctx, recipe, device):
    """A decode step's inputs at this shape: q, this step's k and v, and a full state of random
    contents (`_fill`) with every chunk but the window compressed, at the last position."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(b, hq, 1, d, device=device, dtype=torch.float16)
    k1, v1 = torch.randn(2, b, h, 1, d, device=device, dtype=torch.float16)
    state = allocate(cache_layout(recipe, b, h, d, ctx, torch.float16), device)
    _fill(state, d, gen)
    return q, k1, v1, state, torch.tensor([ctx - 1], device=device)


def bench(label, b, hq, h, d, ctx, recipe_name, bandwidth, device="cuda") -> dict:
    recipe = gearfx.load_recipe(recipe_name)
    q, k1, v1, state, cache_position = _cache(b, hq, h, d, ctx, recipe, device)
    kc = torch.randn(b, h, ctx, d, device=device, dtype=torch.float16)
    vc = torch.randn_like(kc)
    sdpa = _time(lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=hq != h))
    fp16_bytes = 2 * kc.numel() * 2
    del kc, vc
    run = lambda: triton_decode.attention(q, state, recipe, ctx, cache_position, None, d ** -0.5, k1, v1)  # noqa: E731
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
    _empty_cache(device)
    return row


def ablation(label, b, hq, h, d, ctx, recipe_name, device="cuda") -> dict:
    """The decode kernel alone (its splits, without their merge) and, for each correction in TERMS
    the recipe has, the same launch with that correction switched off: milliseconds each."""
    recipe = gearfx.load_recipe(recipe_name)
    q, k1, v1, state, cache_position = _cache(b, hq, h, d, ctx, recipe, device)
    run = triton_decode.launch(q, state, recipe, ctx, cache_position, None, d ** -0.5, k1, v1)

    def kernel(**off) -> float:
        constants = {**run.constants, **off}
        return _time(lambda: triton_decode._decode_kernel[run.grid](*run.args, **constants))

    row = dict(shape=label, recipe=recipe_name, kernel_only_ms=kernel())
    for term, off in terms(run.constants).items():
        row[f"without {term} ms"] = kernel(**off)
    del state
    _empty_cache(device)
    return row


def _empty_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


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
    rows, terms = [], []

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, bandwidth_bytes_per_s=bandwidth, check_max_abs_error=errors, rows=rows,
                               terms=terms), f, indent=1)

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
    for recipe in recipes:
        if recipe.startswith("gear"):
            print(f"{time.perf_counter() - start:.0f} s: where {recipe}'s time goes", flush=True)
            row = ablation(*SHAPES[0], recipe)
            terms.append(row)
            print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else str(v) for k, v in row.items()), flush=True)
            save()


if __name__ == "__main__":
    main()

"""gearfx's torch.library ops: what the rewritten program calls at each attention site.

Both store a layer's new keys/values into its compressed state and return the attention output
(see `reference.attend`); the recipe and capacity travel as a JSON string argument, so the graph
alone says what each site does.

- `gearfx::attend` has a CompositeImplicitAutograd kernel: any retrace (run_decompositions,
  export lowering) inlines it into plain aten ops, so export pipelines need no custom kernel.
- `gearfx::attend_kernel` is opaque to the program around it. Its CPU kernel is the reference
  compiled with Inductor once per site config and kind of call (`_compiled`), so the thirty
  identical layers of a model share one compiled kernel instead of each inlining its own copy
  into the model's graph (which made compiling a 30-layer model take minutes); a cache that
  quantizes nothing (fp16, h2o) runs the reference eagerly. On CUDA, decode steps run the Triton
  kernel (`triton_decode`). The runtime swaps it in (`passes.use_kernels`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from functools import lru_cache, partial
import torch

from gearfx.compress.layout import Meta, cache_layout
from gearfx.ops import reference
from gearfx.recipes import Recipe, parse_recipe


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    """What one attention site's op needs besides tensors: its layer's recipe and the capacity."""

    recipe: Recipe
    capacity: int

    def to_json(self) -> str:
        body = dataclasses.asdict(dataclasses.replace(self.recipe, layers=()))
        del body["layers"]
        return json.dumps({"recipe": body, "capacity": self.capacity}, sort_keys=True)

    @staticmethod
    @lru_cache(maxsize=None)
    def from_json(text: str) -> SiteConfig:
        data = json.loads(text)
        return SiteConfig(parse_recipe(data["recipe"]), data["capacity"])

    def layout(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict[str, Meta]:
        return cache_layout(self.recipe, batch, heads, head_dim, self.capacity, dtype)


_lib = torch.library.Library("gearfx", "DEF")
_lib.define(
    "attend(Tensor q, Tensor k, Tensor v, Tensor cache_position, Tensor? attn_mask, float scale, "
    "str config, Tensor(a!)[] state) -> Tensor"
)


def _attend(q, k, v, cache_position, attn_mask, scale, config, state):
    return _run(SiteConfig.from_json(config))(q, k, v, cache_position, attn_mask, scale, state)


_lib.impl("attend", _attend, "CompositeImplicitAutograd")


def _run(cfg: SiteConfig, attend=reference.attend):
    def run(q, k, v, cache_position, attn_mask, scale, state):
        b, h, _, d = k.shape
        names = cfg.layout(b, h, d, k.dtype)
        return attend(q, k, v, cache_position, attn_mask, scale, cfg.recipe, cfg.capacity, dict(zip(names, state)))
    return run


_CONTEXT = {"GRAD_MODE", "GLOBAL_STATE", "TORCH_FUNCTION_STATE", "DEFAULT_DEVICE", "AUTOGRAD_SAVED_TENSORS_HOOKS",
            "DUPLICATE_INPUT", "SHAPE_ENV"}


def _argument_guards(arguments: frozenset[str], entries) -> list[bool]:
    """Dynamo's guards to keep on a site kernel taking `arguments`: those on the arguments (shapes,
    dtypes, strides, the scale), the relations a dynamic (prefill) kernel assumed between its
    sizes, and grad mode, device and input aliasing. The rest (~400) guard the closure's site
    config and the modules' functions, which a kernel's own code object never sees change;
    checking them took 70 of the 80 us each call spent in dynamo's cache lookup (2 ms of a
    30-layer decode step)."""
    return [e.guard_type in _CONTEXT or (re.match(r"\w*", e.name).group() in arguments
                                          and e.guard_type != "DIMENSION_DYNAMIC_MARKING_GUARD") for e in entries]


@lru_cache(maxsize=None)
def _compiled(config: str, kind: str):
    """The site's attention without its rotation (`reference.attend_rotated`), compiled, for one
    kind of call: "decode", "close" (a decode step that closes a chunk, `reference.closes_chunk`),
    "start" (a prefill from position 0, which then attends over the prompt's keys only) or
    "prefill". Decided outside the trace: read inside it, the position split the graph and
    compiled decode went wrong; and a `torch.cond` for the chunk close kept the decode kernel out
    of Inductor's FX graph cache (it caches no higher-order ops), so every process compiled it
    again (6 s for SmolLM2's kivi-4bit).

    Decode steps (L = 1) get a static kernel. Prefill lengths vary: L is its kernel's one dynamic
    size (`_length_dynamic`).
    The rotation stays outside (`attend_kernel`): inside, Inductor ordered a read of the value
    codes after their chunk write and so copied the whole store twice per step (8k tokens, 32
    heads: +6 ms on a 16 ms step)."""
    prefill = kind in ("start", "prefill")
    attend = partial(reference.attend_rotated, starts=kind == "start" if prefill else None,
                     closes=None if prefill else kind == "close")
    run = _run(SiteConfig.from_json(config), attend)
    # A code object of its own per kernel: dynamo caches compiled entries per code object, and one
    # shared by every config would reach its recompile limit (and fall back to eager) after a few.
    run.__code__ = run.__code__.replace(co_name=f"gearfx_attend_{kind}")
    arguments = frozenset(inspect.signature(run).parameters)
    # cpp_wrapper: the kernel's driver (buffer allocations, extern calls) in C++, not Python; a
    # site's graph allocates ~50 buffers, which took ~0.1 ms of a SmolLM2 layer's decode step
    # (gear-4bit 1.0 -> 0.87 ms, H2O 0.85 -> 0.75) for about the same compile time.
    # emulate_precision_casts: round fp16 intermediates where eager does, so a chunk is compressed
    # to the reference's bytes; fused in fp32, ~0.1% of its codes moved a step (and a GEAR chunk's
    # low-rank fit with them). No cost measured on the decode step (SmolLM2 layer, within noise).
    options = {"guard_filter_fn": partial(_argument_guards, arguments), "cpp_wrapper": True,
               "emulate_precision_casts": True}
    # Not dynamic=True: that makes every int and float the code reads symbolic, the closure's
    # recipe and capacity included, and the float ones (scale, the outlier fraction) made Dynamo
    # restart its analysis; `_length_dynamic` marks the one size that varies.
    return torch.compile(run, dynamic=False, options=options)


def _length_dynamic(q, k, v, cache_position, attn_mask):
    """Mark a prefill's length L as the only dynamic size of its kernel's inputs (q/k/v [B, H, L, D],
    cache_position [L], attn_mask [B|1, 1, L, capacity]). maybe_: code that needed a concrete
    length would compile once per length rather than fail (tests/test_compile.py checks that a
    second prompt length compiles nothing)."""
    for t, dim in ((q, 2), (k, 2), (v, 2), (cache_position, 0), (attn_mask, 2)):
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, dim)


_lib.define(
    "attend_kernel(Tensor q, Tensor k, Tensor v, Tensor cache_position, Tensor? attn_mask, float scale, "
    "str config, Tensor(a!)[] state) -> Tensor"
)


def attend_kernel(q, k, v, cache_position, attn_mask, scale, config, state):
    decode = q.shape[2] == 1
    cfg = SiteConfig.from_json(config)
    if decode and q.is_cuda:
        from gearfx.ops import triton_decode  # triton ships with CUDA builds of torch only

        if triton_decode.supports(cfg.recipe, q.shape[-1]):
            b, h, _, d = k.shape
            named = dict(zip(cfg.layout(b, h, d, k.dtype), state))
            return triton_decode.decode(q, k, v, cache_position, attn_mask, scale, cfg.recipe, cfg.capacity, named)
    if not cfg.recipe.compresses:  # index_copy + SDPA (or H2O's gathers) are already whole kernels:
        # Inductor adds only its call overhead (fp16 decode, SmolLM2 layer at capacity 4608: 1.07 ms
        # compiled, 0.59 ms eager; h2o 1.87 / 1.40 ms)
        return _run(cfg)(q, k, v, cache_position, attn_mask, scale, state).contiguous()
    if decode:
        kind = "close" if reference.closes_chunk(cache_position, cfg.recipe, cfg.capacity) else "decode"
    else:
        kind = "start" if bool(cache_position[0] == 0) else "prefill"
    if kind == "start":  # asked here: the compiled code cannot read the mask on the host either
        attn_mask = reference.causal_if_plain(attn_mask, q.shape[2])
    run = _compiled(config, kind)

    def call(q, k, v, pos, mask, scale, *_):
        if not decode:
            _length_dynamic(q, k, v, pos, mask)
        return run(q, k, v, pos, mask, scale, state)

    out = reference.with_rotation(call, q, k, v, cache_position, attn_mask, scale, cfg.recipe, cfg.capacity, state)
    return out.contiguous()


# Defined with torch.library.Library rather than the custom_op decorator: its Python wrapper
# costs about 50 us a call, i.e. 1.5 ms per decode step of a 30-layer model, for autograd
# support inference never uses.
_lib.impl("attend_kernel", attend_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("gearfx::attend_kernel")
def _(q, k, v, cache_position, attn_mask, scale, config, state):
    # contiguous, whatever q's strides: q is usually a transposed view, the output never is
    return q.new_empty(q.shape)

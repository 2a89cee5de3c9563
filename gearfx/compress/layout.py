"""The compressed cache's state tensors, and exact byte accounting derived from them.

One decoder layer's cache is a set of named tensors with static shapes (B batch, H KV heads,
D head_dim). A cache that compresses keeps its uncompressed parts (window, outlier deltas, bits=16
tensors) in 16 bits: the model's dtype for fp16/bf16 models, fp16 for fp32 models, as GEAR and
KIVI store them; a cache that does not quantize (fp16, h2o recipes) keeps the model's dtype, so it
is exact.

- no compression (fp16 recipe): key.data, value.data [B, H, capacity, D].
- compression, no eviction: N = ceil(capacity / window) chunk slots per head, each holding one
  compressed chunk of `window` tokens (`chunk_layout`), plus window.key / window.value
  [B, H, window, D], the full-precision tokens of the chunk being filled; with `sinks: N`, also
  sink.key / sink.value [B, H, N, D], the first N positions kept exactly.
- H2O eviction: S = sinks + heavy + recent slots of one token each, compressed one token at a time
  (so eviction can overwrite any single slot), plus h2o.scores [B, H, S] fp32 (accumulated
  attention) and h2o.positions [B, H, S] int32 (sequence position in each slot, -1 when empty);
  if it compresses, also window.key / window.value [B, H, window, D], the newest `window` tokens
  in full precision (position p at index p % window), read instead of their slots.
- Both keep row.start [B] int64, each row's first real position (its left padding's length),
  found at the sequence's start: padding is left out of compression and sinks are taken after it
  (`gearfx.compress.sinks`).

Every byte a cache needs is in these tensors, so `cache_bytes` (and the memory report built on
it) is the exact size of the allocated state, not an estimate.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from gearfx.compress.quantize import META_DTYPE, packed_size
from gearfx.compress.sparse import index_dtype
from gearfx.recipes import Recipe, RecipeError, TensorSpec


class Meta(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def chunk_layout(spec: TensorSpec, tokens: int, head_dim: int, dtype: torch.dtype) -> dict[str, Meta]:
    """Tensors of one compressed chunk of `tokens` x `head_dim` (no leading dims), as
    `gear.compress` produces them; a spec with bits=16 stores the chunk as is ("data")."""
    if not spec.quantized:
        return {"data": Meta((tokens, head_dim), dtype)}
    if spec.axis == "channel":
        groups = (tokens // spec.group, head_dim)
    else:
        groups = (tokens, head_dim // spec.group)
    out = {
        "codes": Meta((tokens, packed_size(head_dim, spec.bits)), torch.uint8),
        "scale": Meta(groups, META_DTYPE),
        "minimum": Meta(groups, META_DTYPE),
    }
    rank = spec.resolve_rank(tokens)
    if rank:
        out["a"] = Meta((tokens, rank), META_DTYPE)
        out["b"] = Meta((head_dim, rank), META_DTYPE)
    k = spec.num_outliers(tokens, head_dim)
    if k:
        out["outlier_delta"] = Meta((k,), dtype)
        out["outlier_index"] = Meta((k,), index_dtype(tokens * head_dim))
    return out


def kept_dtype(recipe: Recipe, dtype: torch.dtype) -> torch.dtype:
    """dtype of the tensors a cache keeps uncompressed, for a model computing in `dtype`."""
    if recipe.compresses and dtype == torch.float32:
        return torch.float16
    return dtype


def slots(recipe: Recipe, capacity: int) -> tuple[int, int]:
    """(slots per head, tokens per slot) of a compressing or evicting cache."""
    if recipe.h2o is not None:
        return sum(recipe.h2o.budget(capacity)), 1
    return math.ceil(capacity / recipe.window), recipe.window


def cache_layout(
    recipe: Recipe, batch: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype
) -> dict[str, Meta]:
    """All state tensors of one layer's cache (see the module docstring), by name."""
    recipe.check_head_dim(head_dim)
    lead = (batch, heads)
    dtype = kept_dtype(recipe, dtype)
    if not recipe.compresses and recipe.h2o is None:
        return {f"{part}.data": Meta(lead + (capacity, head_dim), dtype) for part in ("key", "value")}
    n, tokens = slots(recipe, capacity)
    out = {}
    for part, spec in (("key", recipe.key), ("value", recipe.value)):
        for name, m in chunk_layout(spec, tokens, head_dim, dtype).items():
            out[f"{part}.{name}"] = Meta(lead + (n,) + m.shape, m.dtype)
    if recipe.h2o is None:
        for part in ("key", "value"):
            out[f"window.{part}"] = Meta(lead + (recipe.window, head_dim), dtype)
        if recipe.sinks:
            for part in ("key", "value"):
                out[f"sink.{part}"] = Meta(lead + (recipe.sinks, head_dim), dtype)
    else:
        if recipe.compresses:
            recent = recipe.h2o.budget(capacity)[1]
            if recipe.window > recent:  # a window token must still hold its slot
                raise RecipeError(
                    f"recipe {recipe.name!r}: field 'window' = {recipe.window} is not allowed with "
                    f"h2o.recent resolving to {recent} tokens at capacity {capacity}; allowed: at "
                    f"most {recent} (the window's tokens are among the recent ones)")
            for part in ("key", "value"):
                out[f"window.{part}"] = Meta(lead + (recipe.window, head_dim), dtype)
        out["h2o.scores"] = Meta(lead + (n,), torch.float32)
        out["h2o.positions"] = Meta(lead + (n,), torch.int32)
    out["row.start"] = Meta((batch,), torch.int64)
    return out


def cache_bytes(
    recipe: Recipe, num_layers: int, batch: int, heads: int, head_dim: int, capacity: int,
    dtype: torch.dtype,
) -> dict[str, int]:
    """Bytes of the whole cache (every layer, with per-layer overrides) by state tensor name."""
    total: dict[str, int] = {}
    for layer in range(num_layers):
        layout = cache_layout(recipe.for_layer(layer), batch, heads, head_dim, capacity, dtype)
        for name, m in layout.items():
            total[name] = total.get(name, 0) + m.nbytes
    return total


def fp16_bytes(num_layers: int, batch: int, heads: int, head_dim: int, capacity: int) -> int:
    """Bytes of an uncompressed fp16 cache of the same capacity: the reference for ratios."""
    return 2 * num_layers * batch * heads * capacity * head_dim * 2


def allocate(layout: dict[str, Meta], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The state tensors of `layout`, initialised as an empty cache (H2O slots marked empty)."""
    return {name: torch.full(m.shape, -1 if name == "h2o.positions" else 0, dtype=m.dtype, device=device)
            for name, m in layout.items()}

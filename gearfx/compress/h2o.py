"""H2O eviction: keep sinks + heavy hitters + a recent window under a fixed budget of slots.

The cache has S = sinks + heavy + recent slots per (batch, KV head). Each slot remembers the
sequence position of the token in it (-1 while empty) and the attention mass that token has
received so far (`h2o.decay` < 1: older mass fades). A new token takes an empty slot while there
is one; after that it overwrites the slot of the lowest-score token that is neither a sink nor
among the `recent` newest. Shapes never change, so eviction compiles without recompiles.
"""

from __future__ import annotations

import torch

from gearfx.compress.sinks import is_sink

EMPTY = -1
POOL = 9  # span of a pooled observation score; SnapKV's 5 kept 3 of a pass key's 5 digits


def accumulate(scores: torch.Tensor, attn: torch.Tensor, decay: float) -> torch.Tensor:
    """Add a decode step's attention mass to the slot scores, older mass scaled by `decay`.

    scores [B, H, S] fp32; attn [B, Hq, L, S] probabilities of Hq = H * g query heads (GQA groups
    of g consecutive heads share a KV head) over the S slots, for L queries (decode: L = 1).
    Returns decay * scores + attn summed over queries and each KV head's query heads: with decay 1
    H2O's sum of all mass received so far, below 1 mostly the mass of the last 1 / (1 - decay) queries.
    """
    return decay * scores + _per_kv_head(attn, scores.shape[1]).sum(dim=2)


def _per_kv_head(attn: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """attn [B, Hq, L, S] -> [B, H, L, S], summed over each KV head's query heads."""
    b, hq, l, s = attn.shape
    return attn.float().reshape(b, kv_heads, hq // kv_heads, l, s).sum(dim=2)


def prefill_scores(attn: torch.Tensor, kv_heads: int, observe: int, decay: float,
                   real: torch.Tensor) -> torch.Tensor:
    """Scores [B, H, L] fp32 of L prompt tokens after a causal prefill, on the scale of
    accumulated attention mass (decode steps add theirs to it, `accumulate`).

    attn [B, Hq, L, L] probabilities of the prompt's queries; real [B, L] bool: prompt tokens, not
    left padding (padding neither takes nor dilutes a pooled score, so a padded row keeps what it
    would keep alone). observe = 0: each token's mass summed
    over every prompt query, as H2O does (query i's scaled by decay ** (L - 1 - i), as if the
    prompt had been decoded one token at a time); that keeps what the whole text leans on, but
    not what the prompt's end (a question) asks for when the rest of the prompt ignored it. observe > 0:
    the larger of that sum and SnapKV's score, the mass from the last `observe` queries averaged
    over POOL neighbouring tokens (so a span, e.g. a number's digits, is kept whole) and rescaled
    to the same total: a token stays if either ranks it heavy.
    """
    b, _, length, _ = attn.shape
    attn = _per_kv_head(attn * real[:, None, :, None], kv_heads)  # padding queries attend to nothing
    age = torch.arange(length - 1, -1, -1, device=attn.device, dtype=torch.float32)
    full = (attn * (decay ** age)[:, None]).sum(dim=2)
    if observe == 0:
        return full.masked_fill(~real[:, None], -1.0)  # padding ranks below every token
    last = torch.arange(length, device=attn.device) >= length - observe  # a mask, not a slice: no shape guard
    observed = (attn * last[:, None]).sum(dim=2)
    real = real[:, None].float()  # [B, 1, L]
    window = dict(kernel_size=POOL, stride=1, padding=POOL // 2)
    pool = torch.nn.functional.avg_pool1d
    pooled = pool(observed * real, **window) / pool(real, **window).clamp_min(1 / POOL) * real
    total = (full * real).sum(-1, keepdim=True) / pooled.sum(-1, keepdim=True)
    return torch.maximum(full, pooled * total).masked_fill(real == 0, -1.0)


def evictable(positions: torch.Tensor, position: int | torch.Tensor, recent: int, sinks: int,
              start: torch.Tensor) -> torch.Tensor:
    """Bool [B, H, S]: slots a token entering at `position` may overwrite.

    positions [B, H, S] int (EMPTY for empty slots); start [B] (`sinks.is_sink`). Sinks stay, and so do
    the recent - 1 newest tokens, which with the new one make the recent window.
    """
    return (positions != EMPTY) & ~is_sink(positions, start, sinks) & (positions <= position - recent)


def choose_slot(
    scores: torch.Tensor, positions: torch.Tensor, position: int | torch.Tensor, recent: int, sinks: int,
    start: torch.Tensor,
) -> torch.Tensor:
    """The slot [B, H] (int64) where the token at sequence `position` goes.

    The first empty slot if there is one, else the evictable slot with the lowest score. With
    recent >= 1 and a full cache of S > sinks + recent - 1 slots there is always an evictable slot.
    """
    empty = positions == EMPTY
    masked = scores.masked_fill(~evictable(positions, position, recent, sinks, start), float("inf"))
    victim = masked.argmin(dim=-1)
    first_empty = empty.int().argmax(dim=-1)  # argmax returns the first maximum
    return torch.where(empty.any(dim=-1), first_empty, victim)


def keep_after_prefill(scores: torch.Tensor, heavy: int, recent: int, sinks: int,
                       start: torch.Tensor) -> torch.Tensor:
    """Positions [B, H, budget] (int64, ascending, EMPTY-padded) to keep after a prefill of L tokens.

    scores [B, H, L]: attention mass of each prompt token (`prefill_scores`). Keeps the
    first `sinks` (from start [B], `sinks.is_sink`), the last `recent`, and the `heavy` highest-scoring
    tokens in between; a prompt shorter than the budget is kept whole. Branch-free, so L can be a dynamic export dimension.
    """
    b, h, length = scores.shape
    budget = heavy + recent + sinks
    pos = torch.arange(length, device=scores.device)
    forced = is_sink(pos.expand(b, 1, length), start, sinks) | (pos >= length - recent)
    priority = scores.float().masked_fill(forced, float("inf"))
    # budget padding entries rank last and stand for empty slots when the prompt is short
    padded = torch.cat([priority, priority.new_full((b, h, budget), float("-inf"))], dim=-1)
    chosen = padded.topk(budget, dim=-1).indices
    chosen = torch.where(chosen < length, chosen, torch.full_like(chosen, length + budget))
    chosen = chosen.sort(dim=-1).values
    return torch.where(chosen < length, chosen, torch.full_like(chosen, EMPTY))

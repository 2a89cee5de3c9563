"""H2O eviction: keep sinks + heavy hitters + a recent window under a fixed budget of slots.

The cache has S = sinks + heavy + recent slots per (batch, KV head). Each slot remembers the
sequence position of the token in it (-1 while empty) and the attention mass that token has
received so far. A new token takes an empty slot while there is one; after that it overwrites the
slot of the lowest-score token that is neither a sink nor among the `recent` newest. Shapes never
change, so eviction compiles without recompiles.
"""

from __future__ import annotations

import torch

EMPTY = -1


def accumulate(scores: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Add attention mass to the slot scores.

    scores [B, H, S] fp32; attn [B, Hq, L, S] probabilities of Hq = H * g query heads (GQA groups
    of g consecutive heads share a KV head) over the S slots, for L query positions.
    Returns scores + attn summed over queries and over each KV head's query heads.
    """
    b, hq, l, s = attn.shape
    h = scores.shape[1]
    return scores + attn.float().reshape(b, h, hq // h, l, s).sum(dim=(2, 3))


def evictable(positions: torch.Tensor, position: int | torch.Tensor, recent: int, sinks: int) -> torch.Tensor:
    """Bool [B, H, S]: slots a token entering at `position` may overwrite.

    positions [B, H, S] int (EMPTY for empty slots). Sinks (position < sinks) stay, and so do the
    recent - 1 newest tokens, which with the new one make the recent window.
    """
    return (positions >= sinks) & (positions <= position - recent)


def choose_slot(
    scores: torch.Tensor, positions: torch.Tensor, position: int | torch.Tensor, recent: int, sinks: int
) -> torch.Tensor:
    """The slot [B, H] (int64) where the token at sequence `position` goes.

    The first empty slot if there is one, else the evictable slot with the lowest score. With
    recent >= 1 and a full cache of S > sinks + recent - 1 slots there is always an evictable slot.
    """
    empty = positions == EMPTY
    masked = scores.masked_fill(~evictable(positions, position, recent, sinks), float("inf"))
    victim = masked.argmin(dim=-1)
    first_empty = empty.int().argmax(dim=-1)  # argmax returns the first maximum
    return torch.where(empty.any(dim=-1), first_empty, victim)


def keep_after_prefill(scores: torch.Tensor, heavy: int, recent: int, sinks: int) -> torch.Tensor:
    """Positions [B, H, budget] (int64, ascending, EMPTY-padded) to keep after a prefill of L tokens.

    scores [B, H, L]: attention mass each prompt token received during the prefill. Keeps the
    first `sinks`, the last `recent`, and the `heavy` highest-scoring tokens in between; a prompt
    shorter than the budget is kept whole. Branch-free, so L can be a dynamic export dimension.
    """
    b, h, length = scores.shape
    budget = heavy + recent + sinks
    pos = torch.arange(length, device=scores.device)
    forced = (pos < sinks) | (pos >= length - recent)
    priority = scores.float().masked_fill(forced, float("inf"))
    # budget padding entries rank last and stand for empty slots when the prompt is short
    padded = torch.cat([priority, priority.new_full((b, h, budget), float("-inf"))], dim=-1)
    chosen = padded.topk(budget, dim=-1).indices
    chosen = torch.where(chosen < length, chosen, torch.full_like(chosen, length + budget))
    chosen = chosen.sort(dim=-1).values
    return torch.where(chosen < length, chosen, torch.full_like(chosen, EMPTY))

"""Attention sinks by token: each row's first `sinks` real tokens, kept exactly.

In a left-padded batch a row's tokens start at its padding's length, not at cache position 0, so
a row's sinks are the positions start .. start + sinks - 1, with start [B] the row's padding
length. Taking them by position would keep padding exactly and quantize the row's real first
tokens, which the model leans on most (the attention-sink token has huge keys on small models).
"""

from __future__ import annotations

import torch


def _per_row(start: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """start [B] viewed to broadcast against `like` [B or 1, ...]."""
    return start.view(-1, *[1] * (like.dim() - 1))


def is_sink(positions: torch.Tensor, start: torch.Tensor, sinks: int) -> torch.Tensor:
    """Bool [B, ...]: which of positions [B or 1, ...] are their row's sinks; start [B] int64."""
    start = _per_row(start, positions)
    return (positions >= start) & (positions < start + sinks)


def held_elsewhere(positions: torch.Tensor, start: torch.Tensor, sinks: int) -> torch.Tensor:
    """Bool [B, ...]: positions [B or 1, ...] that a compressed chunk leaves out of its ranges,
    outliers and low-rank fit: the row's padding (never attended) and its sinks (kept exactly),
    so neither can stretch the quantization of the row's other tokens."""
    return positions < _per_row(start, positions) + sinks


def sink_positions(start: torch.Tensor, sinks: int) -> torch.Tensor:
    """[B, sinks] int64: each row's sink positions."""
    return start[:, None] + torch.arange(sinks, device=start.device)

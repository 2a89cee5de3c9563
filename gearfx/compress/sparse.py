"""GEAR's sparse correction: a fixed number of entries per chunk corrected exactly, as deltas + indices.

A fixed budget k per chunk keeps every shape static. Indices address the flattened [T, D] chunk and
are stored in the narrowest integer type that holds T * D, since at head_dim 64 they would otherwise
cost as much as the values.
"""

from __future__ import annotations

import torch


def index_dtype(numel: int) -> torch.dtype:
    """Integer dtype for flat indices into a chunk of `numel` entries."""
    if numel <= 2**8:
        return torch.uint8
    return torch.int16 if numel <= 2**15 else torch.int32


def select(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices [..., k] of the k largest scores of each chunk score [..., T, D], ascending."""
    flat = score.flatten(-2)
    idx = flat.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    return idx.to(index_dtype(flat.shape[-1]))


def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The entries of x [..., T, D] at flat indices [..., k] -> [..., k]."""
    return x.flatten(-2).gather(-1, index.long())


def mask(index: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bool mask [..., T, D] that is True at the flat indices [..., k]."""
    flat = torch.zeros(*shape[:-2], shape[-2] * shape[-1], dtype=torch.bool, device=index.device)
    return flat.scatter(-1, index.long(), True).view(shape)


def add_at(x: torch.Tensor, delta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [..., T, D] with delta [..., k] added at the flat indices [..., k] (distinct)."""
    flat = x.flatten(-2).scatter_add(-1, index.long(), delta.to(x.dtype))
    return flat.view(x.shape)

"""One chunk of K or V through GEAR: sparse outliers out, quantize the rest, low-rank the error.

    x ≈ dequantize(codes) + a @ b.T + scatter(outlier_delta at outlier_index)

Outliers are chosen as the entries farthest from their quantization group's mean: those are the
ones that stretch a group's range (for per-channel keys, a large channel is not an outlier; a
spike inside a channel is). They are taken out before quantizing, so the remaining range is
tighter. The low-rank factors then fit what quantization lost everywhere else. Each outlier is
stored as its delta, the value minus what codes and factors give there, in the cache dtype: an
outlier comes back to within that dtype's rounding, and attention over the codes adds the delta
as is, without reading codes, scales or factors at the outlier again on every decode step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from gearfx.compress import lowrank, quantize, sparse
from gearfx.compress.quantize import META_DTYPE
from gearfx.recipes import TensorSpec


class Chunk(NamedTuple):
    """A compressed chunk of T tokens x D channels (leading dims: batch, head, ...).

    codes [..., T, D * bits / 8] uint8; scale, minimum fp16 (see `quantize.quantize` for shapes);
    a [..., T, r], b [..., D, r] fp16 or None when rank is 0; outlier_delta [..., k] (cache dtype):
    each outlier's value minus dequantize(codes) + a @ b.T there; outlier_index [..., k] flat
    indices into [T, D], uint8/int16/int32 (`sparse.index_dtype`); both None without outliers.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    a: torch.Tensor | None
    b: torch.Tensor | None
    outlier_delta: torch.Tensor | None
    outlier_index: torch.Tensor | None


def outlier_score(x: torch.Tensor, axis: str, group: int, skip: torch.Tensor | None = None) -> torch.Tensor:
    """|x - mean of its quantization group|, [..., T, D]; skipped entries (bool mask broadcastable
    to x) are left out of the means and score -1, below every real entry."""
    dim = -2 if axis == "channel" else -1
    g = quantize._per_group(x.float(), axis, group)
    if skip is None:
        return (g - g.mean(dim=dim, keepdim=True)).abs().reshape(x.shape)
    keep = quantize._per_group((~skip).expand(x.shape).float(), axis, group)
    mean = (g * keep).sum(dim=dim, keepdim=True) / keep.sum(dim=dim, keepdim=True).clamp_min(1)
    return (g - mean).abs().reshape(x.shape).masked_fill(skip, -1.0)


def compress(x: torch.Tensor, spec: TensorSpec, loops: int, seed: int,
             skip: torch.Tensor | None = None) -> Chunk:
    """Compress x [..., T, D] (T = the recipe's window) as `spec` says.

    loops, seed: power-iteration loops and the seed of its starting block (`lowrank.start_vectors`).
    skip: optional bool mask broadcastable to x ([..., T, 1] for whole tokens) of entries stored
        exactly elsewhere (attention sinks): they are left out of the quantization ranges, the
        outlier selection and the low-rank fit, so they cannot stretch or steal from the rest.
    """
    t, d = x.shape[-2:]
    k = spec.num_outliers(t, d)
    index = delta = None
    exclude = None if skip is None else skip.expand(x.shape)
    if k:
        index = sparse.select(outlier_score(x, spec.axis, spec.group, skip), k)
        outliers = sparse.mask(index, x.shape)
        exclude = outliers if exclude is None else exclude | outliers
    codes, scale, minimum = quantize.quantize(x, spec.bits, spec.axis, spec.group, exclude)
    a = b = None
    rank = spec.resolve_rank(t)
    if rank or k:
        approx = quantize.dequantize(codes, scale, minimum, spec.bits, spec.axis, spec.group)
    if rank:
        error = x.float() - approx
        if exclude is not None:  # outliers and sinks come back exactly: nothing there to fit
            error = error.masked_fill(exclude, 0.0)
        a, b = lowrank.power_iteration(error, lowrank.start_vectors(d, rank, seed, x.device), loops)
        a, b = a.to(META_DTYPE), b.to(META_DTYPE)
        approx = approx + a.float() @ b.float().mT  # the factors as stored
    if k:
        delta = sparse.gather(x.float() - approx, index).to(x.dtype)
    return Chunk(codes, scale, minimum, a, b, delta, index)


def decompress(c: Chunk, spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    """The reconstruction [..., T, D] of a compressed chunk, in `dtype`."""
    x = quantize.dequantize(c.codes, c.scale, c.minimum, spec.bits, spec.axis, spec.group)
    if c.a is not None:
        x = x + c.a.float() @ c.b.float().mT
    if c.outlier_index is not None:
        x = sparse.add_at(x, c.outlier_delta.float(), c.outlier_index)
    return x.to(dtype)

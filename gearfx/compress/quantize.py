"""KIVI-layout asymmetric quantization on torchao's affine primitives, with packed codes.

Each group stores a scale and its minimum (both fp16) and codes q in [0, 2**bits - 1]:
x ≈ q * scale + minimum. Using the group minimum as the offset (instead of torchao's default
zero point, which forces 0 into the range) matters for keys: their outlier channels sit far from 0,
and a range stretched to include 0 would waste most of the codes. torchao quantizes x - minimum,
whose range starts at 0, so its zero point is exactly 0 and is not stored.

Layouts, for x of shape [..., T, D] (T tokens, D channels):
- axis="channel": one scale per channel and `group` consecutive tokens; scale [..., T/group, D].
- axis="token":   one scale per token and `group` consecutive channels; scale [..., T, D/group].
Codes are packed along D with torchao's uintx bit packing: [..., T, D * bits / 8] uint8.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torchao.prototype.dtypes.uintx.bitpacking import pack as _pack_shards
from torchao.prototype.dtypes.uintx.bitpacking import unpack as _unpack_shards
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine_with_min_max,
    dequantize_affine,
    quantize_affine,
)

META_DTYPE = torch.float16  # scales, minimums and factors are stored in fp16

# torchao packs b-bit codes as shards of 4, 2 and 1 bits (e.g. 3 = 2 + 1, 7 = 4 + 2 + 1)
_SHARD_BITS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 7: (4, 2, 1)}


_TARGET = {b: getattr(torch, f"uint{b}") for b in range(1, 9)}  # torchao's quantization targets


def _target_dtype(bits: int) -> torch.dtype:
    return _TARGET[bits]


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take once packed."""
    if n * bits % 8 or (bits < 8 and any(n * s % 8 for s in _SHARD_BITS[bits])):
        raise ValueError(f"{n} codes of {bits} bits do not pack into whole bytes")
    return n * bits // 8


class Shard(NamedTuple):
    """One shard of a packed row of D codes: `width` bits of each code, the bits from `low` up,
    in `n` = D * width / 8 bytes starting at byte `offset` of the row. Code d sits in bits
    width * (d // n) of byte offset + d % n."""

    width: int
    offset: int
    n: int
    low: int


def shards(d: int, bits: int) -> list[Shard]:
    """torchao's uintx layout of a row of `d` codes of `bits` (< 8) bits, shard by shard."""
    out, offset, low = [], 0, 0
    for width in _SHARD_BITS[bits]:
        n = d * width // 8
        out.append(Shard(width, offset, n, low))
        offset, low = offset + n, low + width
    return out


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D] uint8 codes < 2**bits -> [..., D * bits / 8] uint8, exact inverse of `unpack`."""
    if bits == 8:
        return codes
    packed_size(codes.shape[-1], bits)
    return torch.cat(_pack_shards(codes, bits, dim=-1), dim=-1)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., D * bits / 8] uint8 -> [..., D] uint8 codes."""
    if bits == 8:
        return packed
    parts = torch.split(packed, [s.n for s in shards(packed.shape[-1] * 8 // bits, bits)], dim=-1)
    return _unpack_shards(list(parts), bits, dim=-1)


def _block(ndim: int, axis: str, group: int) -> tuple[int, ...]:
    lead = (1,) * (ndim - 2)
    return lead + ((group, 1) if axis == "channel" else (1, group))


def _per_group(x: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """[..., T, D] -> [..., T/g, g, D] (channel) or [..., T, D/g, g] (token): groups on dim -2/-1."""
    *lead, t, d = x.shape
    if axis == "channel":
        return x.reshape(*lead, t // group, group, d)
    return x.reshape(*lead, t, d // group, group)


def expand(meta: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """A per-group tensor ([..., T/g, D] or [..., T, D/g]) repeated to [..., T, D]."""
    return meta.repeat_interleave(group, dim=-2 if axis == "channel" else -1)


def quantize(
    x: torch.Tensor, bits: int, axis: str, group: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize x [..., T, D] to packed codes.

    exclude: optional bool mask [..., T, D] of entries left out of each group's range (GEAR
        outliers, corrected elsewhere; attention sinks, kept elsewhere); they are clamped into the range.
    Returns (codes [..., T, D * bits / 8] uint8, scale, minimum), scale and minimum fp16 of shape
    [..., T/group, D] (axis="channel") or [..., T, D/group] (axis="token").
    """
    reduce_dim = -2 if axis == "channel" else -1
    xf = x.float()
    lo_src = xf if exclude is None else xf.masked_fill(exclude, float("inf"))
    hi_src = xf if exclude is None else xf.masked_fill(exclude, float("-inf"))
    lo = _per_group(lo_src, axis, group).amin(dim=reduce_dim)
    hi = _per_group(hi_src, axis, group).amax(dim=reduce_dim)
    if exclude is not None:  # a group with every entry excluded has no range of its own
        lo, hi = lo.nan_to_num(posinf=0.0), hi.nan_to_num(neginf=0.0)
        lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    minimum = lo.to(META_DTYPE)
    target = _target_dtype(bits)
    block = _block(x.dim(), axis, group)
    scale, zero = choose_qparams_affine_with_min_max(
        torch.zeros_like(lo), hi - minimum.float(), MappingType.ASYMMETRIC, block, target,
        eps=torch.finfo(META_DTYPE).tiny, scale_dtype=META_DTYPE, zero_point_dtype=torch.int32,
    )
    # Codes are computed from the stored fp16 minimum and scale, so dequantization is exact to them.
    shifted = xf - expand(minimum.float(), axis, group)
    codes = quantize_affine(shifted, block, scale.float(), zero, target)
    return pack(codes, bits), scale, minimum


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, axis: str,
    group: int, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of `quantize`: packed codes [..., T, D * bits / 8] -> x [..., T, D] in `dtype`."""
    q = unpack(codes, bits)
    block = _block(q.dim(), axis, group)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    x = dequantize_affine(q, block, scale.float(), zero, _target_dtype(bits), output_dtype=torch.float32)
    return (x + expand(minimum.float(), axis, group)).to(dtype)


def step(scale: torch.Tensor, axis: str, group: int) -> torch.Tensor:
    """The quantization step of every entry, [..., T, D]: rounding error is at most half of it."""
    return expand(scale.float(), axis, group)

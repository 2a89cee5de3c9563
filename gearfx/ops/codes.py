"""Attention terms read straight from packed codes: the decode path Inductor fuses on the CPU.

    scores: q · deq(K)ᵀ        values: p · deq(V)

are written as pointwise ops + one reduction over the packed bytes, with a constant shift per code
position in a byte and the quantization scale folded into the query (or the probabilities) once
per group. Inductor's C++ backend turns each into a single loop that reads every byte once and
never writes K or V out. Dequantizing first writes and rereads 4 bytes per element: measured 22x
slower than fp32 SDPA at 8k context on one thread; the key term alone here runs 2x faster than
the fp32 matmul it replaces.

Shapes: B batch, H KV heads, g query heads per KV head, T tokens of the store (chunks flattened),
D head_dim; codes [B, H, T, D * bits / 8] uint8, scale/minimum as `quantize.quantize` lays them out
([B, H, T/group, D] per channel, [B, H, T, D/group] per token).
"""

from __future__ import annotations

import torch

from gearfx.compress import quantize
from gearfx.recipes import TensorSpec


def _parts(codes: torch.Tensor, bits: int, d: int) -> list[tuple[int, torch.Tensor]]:
    """(first channel, codes [B, H, T, N] fp32) of each run of N channels a byte packs together.

    torchao packs a 2/4-bit code of channel j*N + i into bits j*bits.. of byte i (N = D*bits/8),
    so part j is one shift and mask of the whole byte row; 8 bits is one part. The widths packed
    as several shards (3 = 2 + 1, 5 = 4 + 1, ...) hold each code's bits from the lowest up, one
    shard after the other along the row; a run as long as the narrowest shard's byte count is a
    slice of every shard at one shift, so each part stays shifts and masks of byte slices (which
    Inductor fuses into the reduction, instead of unpacking the whole store first)."""
    if bits == 8:
        return [(0, codes.float())]
    layout = quantize.shards(d, bits)
    run = min(s.n for s in layout)
    parts = []
    for first in range(0, d, run):
        code = None
        for s in layout:
            start = s.offset + first % s.n
            piece = (codes[..., start:start + run] >> (s.width * (first // s.n))) & (2**s.width - 1)
            code = piece if code is None else code | (piece << s.low)
        parts.append((first, code.float()))
    return parts


def scores(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
           spec: TensorSpec) -> torch.Tensor:
    """q [B, H, g, D] · deq(codes)ᵀ -> [B, H, g, T] fp32."""
    b, h, g, d = q.shape
    t = codes.shape[2]
    q = q.float()
    out = q.new_zeros(())
    if spec.axis == "channel":  # sum_d (q_d s_d) code_td + sum_d q_d m_d, per group of tokens
        rows = t // spec.group
        qs = q[:, :, :, None, None, :] * scale.float().view(b, h, 1, rows, 1, d)
        for first, part in _parts(codes, spec.bits, d):
            n = part.shape[-1]
            out = out + (part.view(b, h, 1, rows, spec.group, n) * qs[..., first:first + n]).sum(-1)
        qm = (q[:, :, :, None, :] * minimum.float().view(b, h, 1, rows, d)).sum(-1)
        return (out + qm[..., None]).view(b, h, g, t)
    group = spec.group  # per token: sum over groups of s_tg * (q · code)_g + m_tg * sum_g q
    s = scale.float()[:, :, None]  # [B, H, 1, T, D/group]
    for first, part in _parts(codes, spec.bits, d):
        n = part.shape[-1]
        sub = min(group, n)
        dots = (part.view(b, h, 1, t, n // sub, sub) * q[..., first:first + n].reshape(b, h, g, 1, n // sub, sub)).sum(-1)
        out = out + (dots * s[..., first // group:first // group + n // sub]).sum(-1)
    qsum = q.view(b, h, g, d // group, group).sum(-1)
    return out + (minimum.float()[:, :, None] * qsum[:, :, :, None, :]).sum(-1)


def values(p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
           spec: TensorSpec) -> torch.Tensor:
    """p [B, H, g, T] · deq(codes) -> [B, H, g, D] fp32."""
    b, h, g, t = p.shape
    d = scale.shape[-1] if spec.axis == "channel" else scale.shape[-1] * spec.group
    p = p.float()
    outs = []
    if spec.axis == "channel":  # per channel: sum over token groups of s_gd * (p · code)_gd
        rows = t // spec.group
        pg = p.view(b, h, g, rows, spec.group)
        s = scale.float().view(b, h, 1, rows, d)
        for first, part in _parts(codes, spec.bits, d):
            n = part.shape[-1]
            inner = (pg[..., None] * part.view(b, h, 1, rows, spec.group, n)).sum(-2)  # [B, H, g, rows, N]
            outs.append((inner * s[..., first:first + n]).sum(-2))
        pm = pg.sum(-1)[..., None] * minimum.float().view(b, h, 1, rows, d)
        return torch.cat(outs, dim=-1) + pm.sum(-2)
    group = spec.group  # per token: the scale folds into p, one column per group
    s = scale.float()[:, :, None]  # [B, H, 1, T, D/group]
    for first, part in _parts(codes, spec.bits, d):
        n = part.shape[-1]
        sub = min(group, n)
        ps = p[..., None] * s[..., first // group:first // group + n // sub]  # [B, H, g, T, N/sub]
        outs.append((ps[..., None] * part.view(b, h, 1, t, n // sub, sub)).sum(3).flatten(-2))
    pm = (p[..., None] * minimum.float()[:, :, None]).sum(3)  # [B, H, g, D/group]
    return torch.cat(outs, dim=-1) + pm.repeat_interleave(group, dim=-1)

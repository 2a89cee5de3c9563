"""Attention terms read straight from packed codes: the decode path Inductor fuses on the CPU.

    scores: q · deq(K)ᵀ        values: p · deq(V)

are written as pointwise ops + one reduction over the packed bytes, with a constant shift per code
position in a byte and the quantization scale folded into the query (or the probabilities) once
per group. Inductor's C++ backend turns each into a single loop that reads every byte once and
never writes K or V out. Dequantizing first writes and rereads 4 bytes per element: measured 22x
slower than fp32 SDPA at 8k context on one thread; the key term alone here runs 2x faster than
the fp32 matmul it replaces.

The g query heads of a KV head are written as g separate terms over the same parts rather than a
broadcast over a g axis: Inductor puts a broadcast axis in an outer loop and unpacks every byte g
times, while separate terms land in one loop that unpacks each byte once for all of them
(one thread, 2026-12-07: 1.2-3x faster per term at SmolLM2's g=3, D=64, 4096 tokens, and
1.7-2.8x at g=4, D=128, 8192 tokens; MHA, g=1, is the same loop).

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
    parts = _parts(codes, spec.bits, d)
    heads = []
    if spec.axis == "channel":  # sum_d (q_d s_d) code_td + sum_d q_d m_d, per group of tokens
        rows = t // spec.group
        s = scale.float().view(b, h, rows, 1, d)
        for j in range(g):
            qs = q[:, :, j, None, None, :] * s
            # the parts' products are summed before the one reduction over channels: a reduction
            # per part costs a horizontal vector sum per part and token
            terms = sum(part.view(b, h, rows, spec.group, -1) * qs[..., first:first + part.shape[-1]]
                        for first, part in parts)
            heads.append(terms.sum(-1).view(b, h, t))
        qm = (q[:, :, :, None, :] * minimum.float().view(b, h, 1, rows, d)).sum(-1)
        return torch.stack(heads, 2) + qm.repeat_interleave(spec.group, dim=-1)
    group = spec.group  # per token: sum over groups of s_tg * (q · code)_g + m_tg * sum_g q
    s = scale.float()  # [B, H, T, D/group]
    for j in range(g):
        # parts narrower than a group share its one reduction, as the per-channel parts above do
        products: dict[int, torch.Tensor] = {}
        for first, part in parts:
            n = part.shape[-1]
            sub = min(group, n)
            prod = part.view(b, h, t, n // sub, sub) * q[:, :, j, first:first + n].reshape(b, h, 1, n // sub, sub)
            at = first // group
            products[at] = products[at] + prod if at in products else prod
        heads.append(sum((p.sum(-1) * s[..., at:at + p.shape[-2]]).sum(-1) for at, p in products.items()))
    qsum = q.view(b, h, g, d // group, group).sum(-1)
    return torch.stack(heads, 2) + (minimum.float()[:, :, None] * qsum[:, :, :, None, :]).sum(-1)


def values(p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
           spec: TensorSpec) -> torch.Tensor:
    """p [B, H, g, T] · deq(codes) -> [B, H, g, D] fp32."""
    b, h, g, t = p.shape
    d = scale.shape[-1] if spec.axis == "channel" else scale.shape[-1] * spec.group
    p = p.float()
    parts = _parts(codes, spec.bits, d)
    heads = []
    if spec.axis == "channel":  # per channel: sum over token groups of s_gd * (p · code)_gd
        rows = t // spec.group
        s = scale.float().view(b, h, rows, d)
        for j in range(g):
            pg = p[:, :, j].view(b, h, rows, spec.group, 1)
            outs = []
            for first, part in parts:
                n = part.shape[-1]
                inner = (pg * part.view(b, h, rows, spec.group, n)).sum(-2)  # [B, H, rows, N]
                outs.append((inner * s[..., first:first + n]).sum(-2))
            heads.append(torch.cat(outs, dim=-1))
        pm = p.view(b, h, g, rows, spec.group).sum(-1)[..., None] * minimum.float().view(b, h, 1, rows, d)
        return torch.stack(heads, 2) + pm.sum(-2)
    group = spec.group  # per token: the scale folds into p, one column per group
    s = scale.float()  # [B, H, T, D/group]
    for j in range(g):
        outs = []
        for first, part in parts:
            n = part.shape[-1]
            sub = min(group, n)
            ps = p[:, :, j, :, None] * s[..., first // group:first // group + n // sub]  # [B, H, T, N/sub]
            outs.append((ps[..., None] * part.view(b, h, t, n // sub, sub)).sum(2).flatten(-2))
        heads.append(torch.cat(outs, dim=-1))
    pm = (p[..., None] * minimum.float()[:, :, None]).sum(3)  # [B, H, g, D/group]
    return torch.stack(heads, 2) + pm.repeat_interleave(group, dim=-1)

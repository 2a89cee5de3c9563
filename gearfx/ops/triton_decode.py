"""Decode attention that reads the compressed cache directly: a Triton flash-decoding kernel.

Rebuilding fp16 keys/values before attention is slower than not compressing at all (DESIGN.md):
the speed of a compressed cache comes only from attention that reads the codes. For one decode
step (one query token per sequence), `attention` computes exactly what `reference.attend` computes
over the cache, without ever materialising K or V:

    score = q · deq(codes)ᵀ + (q · B) · Aᵀ + q[dim] · delta          (per compressed token)
    out   = p · deq(codes)  + (p · A) · Bᵀ + p[token] · delta         (per channel)

where deq unpacks torchao's uintx shards in registers, (A, B) are each chunk's GEAR factors and
delta = outlier value − what codes and factors give there, stored so at chunk close
(`gear.Chunk`): the kernel reads it as is. Sparse corrections become small dense products with
one-hot matrices, which keeps every step a tensor-core `tl.dot`.

The grid is (batch · KV heads, splits + 1): every program takes the query heads of one KV head
(GQA/MQA for free), splits walk the compressed store flash-decoding style, and the last program
attends the full-precision tokens (sinks, the window being filled). H2O has no such program: its
window's tokens and the newest one hold slots too, and the splits read them from full precision
in place of the slots' codes. A second kernel merges the splits' partial softmaxes. For H2O it also returns the softmax
normaliser so the per-slot attention mass (eviction scores) costs no extra pass over the cache.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gearfx.compress import h2o
from gearfx.compress.layout import kept_dtype, slots
from gearfx.ops import reference
from gearfx.recipes import Recipe, TensorSpec

BITS = (2, 3, 4, 5, 6, 7, 8, 16)  # every width `quantize` packs, and 16 = stored as is


@triton.jit
def _shard(row_ptr, chan, OFFSET: tl.constexpr, S: tl.constexpr, R: tl.constexpr, D: tl.constexpr, mask):
    """Bits R..R+S-1 of each code: torchao packs an S-bit shard of D codes into D*S/8 bytes, code
    j*(D*S/8) + i in bits j*S.. of byte i."""
    byte = tl.load(row_ptr + OFFSET + chan % (D * S // 8), mask=mask, other=0).to(tl.int32)
    return ((byte >> ((chan // (D * S // 8)) * S)) & ((1 << S) - 1)) << R


@triton.jit
def _codes(row_ptr, chan, BITS: tl.constexpr, D: tl.constexpr, mask):
    """Integer codes at (row, chan) from a packed row; shards as torchao's uintx layout."""
    if BITS == 8:
        return tl.load(row_ptr + chan, mask=mask, other=0).to(tl.int32)
    elif BITS == 2 or BITS == 4:
        return _shard(row_ptr, chan, 0, BITS, 0, D, mask)
    elif BITS == 3:
        return _shard(row_ptr, chan, 0, 2, 0, D, mask) | _shard(row_ptr, chan, D // 4, 1, 2, D, mask)
    elif BITS == 5:
        return _shard(row_ptr, chan, 0, 4, 0, D, mask) | _shard(row_ptr, chan, D // 2, 1, 4, D, mask)
    elif BITS == 6:
        return _shard(row_ptr, chan, 0, 4, 0, D, mask) | _shard(row_ptr, chan, D // 2, 2, 4, D, mask)
    else:
        return (_shard(row_ptr, chan, 0, 4, 0, D, mask) | _shard(row_ptr, chan, D // 2, 2, 4, D, mask)
                | _shard(row_ptr, chan, D // 2 + D // 4, 1, 6, D, mask))


@triton.jit
def _load(codes, scale, minimum, tok, chan, mask, D: tl.constexpr, BITS: tl.constexpr,
          CHANNEL: tl.constexpr, GROUP: tl.constexpr):
    """Stored values at (tok, chan) of one head's store, fp32, any broadcastable index shapes.

    codes: [T, D*BITS/8] uint8 (or [T, D] raw values when BITS == 16); scale, minimum: [T/GROUP, D]
    (CHANNEL) or [T, D/GROUP] fp16."""
    if BITS == 16:
        return tl.load(codes + tok * D + chan, mask=mask, other=0.0).to(tl.float32)
    q = _codes(codes + tok * (D * BITS // 8), chan, BITS, D, mask)
    if CHANNEL:
        meta = (tok // GROUP) * D + chan
    else:
        meta = tok * (D // GROUP) + chan // GROUP
    s = tl.load(scale + meta, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(minimum + meta, mask=mask, other=0.0).to(tl.float32)
    return q.to(tl.float32) * s + m


@triton.jit
def _perm(c, D: tl.constexpr, BITS: tl.constexpr):
    """The channel held by column c of a tile: a tile unpacks a 2/4-bit row byte by byte, so its
    columns come out interleaved (byte i's P = 8/BITS codes are channels i, i + D/P, ...)."""
    if BITS == 2 or BITS == 4:
        return (c % (8 // BITS)) * (D * BITS // 8) + c // (8 // BITS)
    else:
        return c


@triton.jit
def _channel_scaled(q3, scale, minimum, t0, nrows, D: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
                    GROUP: tl.constexpr, R: tl.constexpr, BLOCK_T: tl.constexpr):
    """codes q3 [BLOCK_T, N, P] (channel j*N + i at [., i, j]) of R scale rows -> fp32 values."""
    i = tl.arange(0, N)[None, None, :, None]
    j = tl.arange(0, P)[None, None, None, :]
    rows = t0 // GROUP + tl.arange(0, R)[:, None, None, None]
    meta = rows * D + j * N + i  # [R, 1, N, P]
    s = tl.load(scale + meta, mask=rows < nrows, other=0.0).to(tl.float32)
    m = tl.load(minimum + meta, mask=rows < nrows, other=0.0).to(tl.float32)
    return tl.reshape(q3, [R, BLOCK_T // R, N, P]).to(tl.float32) * s + m


@triton.jit
def _token_scaled(q3, scale, minimum, tok, ok, D: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
                  GROUP: tl.constexpr, GS: tl.constexpr, BLOCK_T: tl.constexpr):
    """codes q3 [BLOCK_T, N, P] with a scale per token and GROUP channels -> fp32 values; GS =
    min(GROUP, N) consecutive bytes share a group."""
    j = tl.arange(0, P)[None, None, None, :]
    ng = tl.arange(0, N // GS)[None, :, None, None]
    meta = tok[:, None, None, None] * (D // GROUP) + (j * N + ng * GS) // GROUP  # [BLOCK_T, N/GS, 1, P]
    s = tl.load(scale + meta, mask=ok[:, None, None, None], other=0.0).to(tl.float32)
    m = tl.load(minimum + meta, mask=ok[:, None, None, None], other=0.0).to(tl.float32)
    return tl.reshape(q3, [BLOCK_T, N // GS, GS, P]).to(tl.float32) * s + m


@triton.jit
def _tile(codes, scale, minimum, tok, t0, ntok, ok, D: tl.constexpr, BITS: tl.constexpr,
          CHANNEL: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Stored values of tokens tok = t0 + [0, BLOCK_T) as a [BLOCK_T, D] fp32 tile, columns in
    `_perm` order; ntok: tokens in the store.

    2 and 4 bits read each row's bytes once, contiguously, split them in registers and apply
    scales loaded once per group; other widths gather each code and scale."""
    if BITS == 2 or BITS == 4:
        byte = tl.load(codes + tok[:, None] * (D * BITS // 8) + tl.arange(0, D * BITS // 8)[None, :],
                       mask=ok[:, None], other=0).to(tl.int32)
        shifts = tl.arange(0, 8 // BITS) * BITS
        q3 = (byte[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BLOCK_T, N, P]
        if CHANNEL:
            if GROUP >= BLOCK_T:
                x = _channel_scaled(q3, scale, minimum, t0, ntok // GROUP, D, D * BITS // 8, 8 // BITS,
                                    GROUP, 1, BLOCK_T)
            else:
                x = _channel_scaled(q3, scale, minimum, t0, ntok // GROUP, D, D * BITS // 8, 8 // BITS,
                                    GROUP, BLOCK_T // GROUP, BLOCK_T)
        else:
            if GROUP >= D * BITS // 8:
                x = _token_scaled(q3, scale, minimum, tok, ok, D, D * BITS // 8, 8 // BITS, GROUP,
                                  D * BITS // 8, BLOCK_T)
            else:
                x = _token_scaled(q3, scale, minimum, tok, ok, D, D * BITS // 8, 8 // BITS, GROUP,
                                  GROUP, BLOCK_T)
        return tl.reshape(x, [BLOCK_T, D])
    else:
        perm = _perm(tl.arange(0, D), D, BITS)
        return _load(codes, scale, minimum, tok[:, None], perm[None, :], ok[:, None], D, BITS, CHANNEL, GROUP)


@triton.jit
def _outliers(delta, index, chunk0, nchunks, D: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
              NCB: tl.constexpr, K_PAD: tl.constexpr):
    """The outliers of chunks chunk0 .. chunk0+NCB-1: (token, channel, delta), each [K_PAD], delta
    as stored (`gear.Chunk`; 0 on padding)."""
    j = tl.arange(0, K_PAD)
    n = chunk0 + j // K
    ok = (j < NCB * K) & (n < nchunks)
    flat = tl.load(index + n * K + j % K, mask=ok, other=0).to(tl.int32)
    value = tl.load(delta + n * K + j % K, mask=ok, other=0.0).to(tl.float32)
    return n * C + flat // D, flat % D, value


@triton.jit
def _mask_bias(mask_row, posn, ok, MASK_KIND: tl.constexpr):
    """The model's additive mask at sequence positions posn ([N]); -inf where not ok."""
    if MASK_KIND == 1:  # bool: attend where true
        allowed = tl.load(mask_row + posn, mask=ok, other=0) != 0
        return tl.where(ok & allowed, 0.0, float("-inf"))
    elif MASK_KIND == 2:  # additive
        bias = tl.load(mask_row + posn, mask=ok, other=0.0).to(tl.float32)
        return tl.where(ok, bias, float("-inf"))
    else:
        return tl.where(ok, 0.0, float("-inf"))


@triton.jit
def _exact(x, W, FRESH, bh, posn, cpos, exact, cols, F: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr):
    """H2O: a tile x [BLOCK_T, D] (columns `cols`) of slots at positions posn, with the tokens of
    the full-precision window (`exact`: the F newest positions, position p at row p % F of W [F, D])
    read from there and this step's token from FRESH [D], in the model's precision."""
    if WINDOW:
        w = tl.load(W + (bh * F + posn % F)[:, None] * D + cols[None, :], mask=exact[:, None], other=0.0)
        x = tl.where(exact[:, None], w.to(tl.float32), x)
    fresh = tl.load(FRESH + bh * D + cols).to(tl.float32)
    return tl.where((posn == cpos)[:, None], fresh[None, :], x)


@triton.jit
def _online(s, m_i, l_i, acc):
    """One flash-attention step: scores s [G, N] (-inf where masked) -> (p, alpha, m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None]


@triton.jit
def _decode_kernel(
    Q, KC, KS, KM, KA, KB, KOD, KOI, VC, VS, VM, VA, VB, VOD, VOI,
    WK, WV, FK, FV, SK, SV, START, MASK, POS, CPOS,
    M_OUT, L_OUT, ACC_OUT, LOGITS,
    sm_scale, T, mask_stride, split_len,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, C: tl.constexpr, NCB: tl.constexpr, SPLITS: tl.constexpr,
    K_BITS: tl.constexpr, K_CHANNEL: tl.constexpr, K_GROUP: tl.constexpr, K_RANK: tl.constexpr,
    K_RPAD: tl.constexpr, K_OUT: tl.constexpr, K_OPAD: tl.constexpr,
    V_BITS: tl.constexpr, V_CHANNEL: tl.constexpr, V_GROUP: tl.constexpr, V_RANK: tl.constexpr,
    V_RPAD: tl.constexpr, V_OUT: tl.constexpr, V_OPAD: tl.constexpr,
    POSITIONAL: tl.constexpr, NSINK: tl.constexpr, F: tl.constexpr, BLOCK_F: tl.constexpr, WINDOW: tl.constexpr,
    MASK_KIND: tl.constexpr, STORE_LOGITS: tl.constexpr, DOT: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    gm = g < G
    q = tl.load(Q + bh * G * D + g[:, None] * D + d[None, :], mask=gm[:, None], other=0.0)
    qf = q.to(tl.float32)
    vperm = _perm(d, D, V_BITS)  # the channel of each column of a value tile and of acc
    cpos = tl.load(CPOS).to(tl.int32)
    mask_row = MASK + b * mask_stride
    nchunks = T // C

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    if split < SPLITS:  # a share of the compressed store
        if K_BITS == 16:
            kc = KC + bh * T * D
        else:
            kc = KC + bh * T * (D * K_BITS // 8)
        if V_BITS == 16:
            vc = VC + bh * T * D
        else:
            vc = VC + bh * T * (D * V_BITS // 8)
        if K_CHANNEL:
            ks, km = KS + bh * (T // K_GROUP) * D, KM + bh * (T // K_GROUP) * D
        else:
            ks, km = KS + bh * T * (D // K_GROUP), KM + bh * T * (D // K_GROUP)
        if V_CHANNEL:
            vs, vm = VS + bh * (T // V_GROUP) * D, VM + bh * (T // V_GROUP) * D
        else:
            vs, vm = VS + bh * T * (D // V_GROUP), VM + bh * T * (D // V_GROUP)
        start = split * split_len
        end = tl.minimum(start + split_len, T)
        closed = (cpos // C) * C  # positions < closed sit in compressed chunks
        kperm = _perm(d, D, K_BITS)
        qk = tl.load(Q + bh * G * D + g[:, None] * D + kperm[None, :], mask=gm[:, None], other=0.0)
        for t0 in range(start, end, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            inside = tok < end
            if POSITIONAL:
                posn = tok
                ok = inside & (tok < closed)
                exact = tok < 0  # none: the window and sinks are the other program's
                if NSINK > 0:  # the row's sinks are attended from the sink buffer
                    row_start = tl.load(START + b)
                    ok = ok & ((tok < row_start) | (tok >= row_start + NSINK))
            else:  # H2O slots: a position per slot, -1 when empty
                posn = tl.load(POS + bh * T + tok, mask=inside, other=-1)
                ok = inside & (posn >= 0)
                # read by `_exact`: the window's F newest positions (F = 1 without a window: this step's)
                exact = ok & (posn > cpos - F)
            bias = _mask_bias(mask_row, posn, ok, MASK_KIND)
            k = _tile(kc, ks, km, tok, t0, T, ok, D, K_BITS, K_CHANNEL, K_GROUP, BLOCK_T)
            if not POSITIONAL:
                k = _exact(k, WK, FK, bh, posn, cpos, exact, kperm, F, D, WINDOW)
            s = tl.dot(qk, tl.trans(k.to(q.dtype)), input_precision=DOT)
            chunk = t0 // C
            if K_RANK > 0:  # (q · B) · Aᵀ of this block's chunk
                r = tl.arange(0, K_RPAD)
                bk = tl.load(KB + ((bh * nchunks + chunk) * D + d[:, None]) * K_RANK + r[None, :],
                             mask=r[None, :] < K_RANK, other=0.0).to(tl.float32)
                ak = tl.load(KA + (bh * T + tok[:, None]) * K_RANK + r[None, :],
                             mask=inside[:, None] & (r[None, :] < K_RANK), other=0.0).to(tl.float32)
                qb = tl.sum(qf[:, :, None] * bk[None, :, :], axis=1)
                s += tl.sum(qb[:, None, :] * ak[None, :, :], axis=2)
            if K_OUT > 0:  # q[chan] · delta at each outlier's token
                otok, ochan, delta = _outliers(KOD + bh * nchunks * K_OUT, KOI + bh * nchunks * K_OUT,
                                               chunk, nchunks, D, C, K_OUT, NCB, K_OPAD)
                qo = tl.load(Q + bh * G * D + g[:, None] * D + ochan[None, :], mask=gm[:, None], other=0.0)
                hit = otok[:, None] == tok[None, :]
                if not POSITIONAL:  # a token read exactly has no correction
                    hit = hit & ~exact[None, :]
                hit = hit.to(q.dtype)
                s += tl.dot((qo.to(tl.float32) * delta[None, :]).to(q.dtype), hit, input_precision=DOT)
            s = s * sm_scale + bias[None, :]
            if STORE_LOGITS:  # empty slots keep the caller's -inf
                tl.store(LOGITS + (bh * G + g[:, None]) * T + tok[None, :], s, mask=gm[:, None] & ok[None, :])
            p, m_i, l_i, acc = _online(s, m_i, l_i, acc)
            v = _tile(vc, vs, vm, tok, t0, T, ok, D, V_BITS, V_CHANNEL, V_GROUP, BLOCK_T)
            if not POSITIONAL:
                v = _exact(v, WV, FV, bh, posn, cpos, exact, vperm, F, D, WINDOW)
            acc += tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT)
            if V_RANK > 0:  # (p · A) · Bᵀ
                r = tl.arange(0, V_RPAD)
                bv = tl.load(VB + ((bh * nchunks + chunk) * D + vperm[:, None]) * V_RANK + r[None, :],
                             mask=r[None, :] < V_RANK, other=0.0).to(tl.float32)
                av = tl.load(VA + (bh * T + tok[:, None]) * V_RANK + r[None, :],
                             mask=inside[:, None] & (r[None, :] < V_RANK), other=0.0).to(tl.float32)
                pa = tl.sum(p[:, :, None] * av[None, :, :], axis=1)
                acc += tl.sum(pa[:, None, :] * bv[None, :, :], axis=2)
            if V_OUT > 0:  # p[token] · delta at each outlier's channel
                otok, ochan, delta = _outliers(VOD + bh * nchunks * V_OUT, VOI + bh * nchunks * V_OUT,
                                               chunk, nchunks, D, C, V_OUT, NCB, V_OPAD)
                hit = tok[:, None] == otok[None, :]
                if not POSITIONAL:
                    hit = hit & ~exact[:, None]
                hit = hit.to(q.dtype)
                po = tl.dot(p.to(q.dtype), hit, input_precision=DOT) * delta[None, :]
                at = (ochan[:, None] == vperm[None, :]).to(q.dtype)
                acc += tl.dot(po.to(q.dtype), at, input_precision=DOT)
    else:  # the full-precision tokens of a positional cache: sinks, then the window being filled
        i = tl.arange(0, BLOCK_F)
        first = cpos // C * C  # position of the window's first token
        if NSINK > 0:
            row_start = tl.load(START + b)
            for f0 in range(0, NSINK, BLOCK_F):
                posn = row_start + f0 + i
                ok = (f0 + i < NSINK) & (posn < first)  # the window holds the later ones
                bias = _mask_bias(mask_row, posn, ok, MASK_KIND)
                rows = (bh * NSINK + f0 + i)[:, None] * D + d[None, :]
                k = tl.load(SK + rows, mask=ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT) * sm_scale + bias[None, :]
                p, m_i, l_i, acc = _online(s, m_i, l_i, acc)
                v = tl.load(SV + rows, mask=ok[:, None], other=0.0)
                acc += tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT)
        for f0 in range(0, F, BLOCK_F):
            posn = first + f0 + i
            ok = (f0 + i < F) & (posn <= cpos)
            bias = _mask_bias(mask_row, posn, ok, MASK_KIND)
            rows = (bh * F + f0 + i)[:, None] * D + d[None, :]
            # this step's token in the model's precision, not the window's 16 bits
            newest = (posn == cpos)[:, None]
            k = tl.load(WK + rows, mask=ok[:, None], other=0.0).to(tl.float32)
            k = tl.where(newest, tl.load(FK + bh * D + d).to(tl.float32)[None, :], k)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT) * sm_scale + bias[None, :]
            p, m_i, l_i, acc = _online(s, m_i, l_i, acc)
            v = tl.load(WV + rows, mask=ok[:, None], other=0.0).to(tl.float32)
            v = tl.where(newest, tl.load(FV + bh * D + d).to(tl.float32)[None, :], v)
            acc += tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT)
    part = bh * tl.num_programs(1) + split  # H2O has no full-precision program
    cols = tl.where(split < SPLITS, vperm, d)  # compressed values accumulate in tile order
    tl.store(M_OUT + part * G + g, m_i, mask=gm)
    tl.store(L_OUT + part * G + g, l_i, mask=gm)
    tl.store(ACC_OUT + (part * G + g[:, None]) * D + cols[None, :], acc, mask=gm[:, None])


@triton.jit
def _combine_kernel(M_IN, L_IN, ACC_IN, OUT, M_OUT, L_OUT,
                    PARTS: tl.constexpr, P_PAD: tl.constexpr, G: tl.constexpr, D: tl.constexpr):
    """Merge the splits' partial softmaxes of one (batch · KV head, query head in group)."""
    bh = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.arange(0, P_PAD)
    d = tl.arange(0, D)
    sm = s < PARTS
    rows = (bh * PARTS + s) * G + g
    m = tl.load(M_IN + rows, mask=sm, other=float("-inf"))
    top = tl.max(m, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(m - top)
    total = tl.sum(w * tl.load(L_IN + rows, mask=sm, other=0.0), axis=0)
    acc = tl.load(ACC_IN + rows[:, None] * D + d[None, :], mask=sm[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(OUT + (bh * G + g) * D + d, out.to(OUT.dtype.element_ty))
    tl.store(M_OUT + bh * G + g, top)
    tl.store(L_OUT + bh * G + g, total)


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def supports(recipe: Recipe, head_dim: int) -> bool:
    """Whether `attention` implements this recipe's decode step (else the reference does)."""
    if head_dim & (head_dim - 1) or head_dim < 16:
        return False
    if recipe.h2o is None:
        c = recipe.window
        if c % 16 and 16 % c:
            return False
        return all(s.resolve_rank(c) == 0 or c % 16 == 0 for s in (recipe.key, recipe.value))
    return True


def _block(recipe: Recipe, chunk: int) -> int:
    """Tokens per block: a power of 2 in 16..64 that divides a chunk or that a chunk divides; a
    block must sit inside one chunk when there are low-rank factors (one B per block)."""
    ranked = any(s.quantized and s.resolve_rank(chunk) for s in (recipe.key, recipe.value))
    block = 64
    while block > 16 and chunk % block and (ranked or block % chunk):
        block //= 2
    return block


def _part(state: dict[str, torch.Tensor], part: str, spec: TensorSpec, chunk: int, dummy: torch.Tensor):
    """Pointers and constants of one store (key or value) for the kernel."""
    get = lambda f: state.get(f"{part}.{f}", dummy)  # noqa: E731 (absent fields are never read)
    rank = spec.resolve_rank(chunk) if spec.quantized else 0
    k = spec.num_outliers(chunk, dummy.shape[-1]) if spec.quantized else 0
    tensors = (get("codes") if spec.quantized else state[f"{part}.data"], get("scale"), get("minimum"),
               get("a"), get("b"), get("outlier_delta"), get("outlier_index"))
    consts = dict(BITS=spec.bits, CHANNEL=spec.axis == "channel", GROUP=spec.group if spec.quantized else 1,
                  RANK=rank, RPAD=_pow2(rank), OUT=k)
    return tensors, consts


def attention(
    q: torch.Tensor, state: dict[str, torch.Tensor], recipe: Recipe, capacity: int,
    cache_position: torch.Tensor, attn_mask: torch.Tensor | None, scale: float,
    fresh_k: torch.Tensor, fresh_v: torch.Tensor, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decode step's attention over a layer's compressed cache, after this step's write.

    q [B, Hq, 1, D]; state: the layer's tensors (`layout.cache_layout`) with the new token already
    written (into the window, or compressed into its H2O slot); cache_position [1] int (on q's
    device); attn_mask [B|1, 1, 1, capacity] bool or additive, or None (causal); fresh_k, fresh_v
    [B, H, 1, D]: the new token, attended in the model's precision (a compressing H2O cache
    attends the other tokens of its window from the window, not from their slots).
    Returns (out [B, Hq, 1, D] in q's dtype, and with H2O the attention probabilities over the
    slots [B, Hq, 1, S] fp32, else None).
    """
    b, hq, _, d = q.shape
    h2o = recipe.h2o is not None
    n, c = slots(recipe, capacity)
    t = n * c
    ref = state["key.codes"] if "key.codes" in state else state["key.data"]
    h = ref.shape[1]
    g = hq // h
    if splits is None:  # decode is memory bound: many programs keep many loads in flight
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        splits = min(triton.cdiv(t, 256), max(triton.cdiv(t, 1024), triton.cdiv(4 * sms, b * h)))
    block = _block(recipe, c)
    split_len = triton.cdiv(triton.cdiv(t, splits), block) * block
    splits = triton.cdiv(t, split_len)
    kt, kc = _part(state, "key", recipe.key, c, q)
    vt, vc = _part(state, "value", recipe.value, c, q)
    fresh_k, fresh_v = fresh_k.contiguous(), fresh_v.contiguous()
    windowed = "window.key" in state
    window_k, window_v = (state["window.key"], state["window.value"]) if windowed else (q, q)
    if h2o:
        positions, nsink = state["h2o.positions"], 0
        f = window_k.shape[2] if windowed else 1
    else:
        positions, f = q, c
        nsink = state["sink.key"].shape[2] if "sink.key" in state else 0
    sinks = (state["sink.key"], state["sink.value"]) if nsink else (q, q)
    if attn_mask is None:
        mask, mask_kind, mask_stride = q, 0, 0
    else:
        row = attn_mask[:, 0, 0, :]
        mask_kind = 1 if row.dtype == torch.bool else 2
        row = row.view(torch.uint8) if mask_kind == 1 else row
        mask, mask_stride = row, (row.stride(0) if row.shape[0] > 1 else 0)
    g_pad = _pow2(g, 16)
    parts = splits if h2o else splits + 1  # + the program of the window and sinks
    m_part = torch.empty(b * h, parts, g, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(b * h, parts, g, d, device=q.device, dtype=torch.float32)
    logits = torch.full((b, h, g, t), float("-inf"), device=q.device) if h2o else q
    ncb = max(1, block // c)
    _decode_kernel[(b * h, parts)](
        q.reshape(b, h, g, d).contiguous(), *kt, *vt, window_k, window_v, fresh_k, fresh_v, *sinks,
        state["row.start"], mask, positions,
        cache_position, m_part, l_part, acc_part, logits,
        scale, t, mask_stride, split_len,
        H=h, G=g, G_PAD=g_pad, D=d, BLOCK_T=block, C=c, NCB=ncb, SPLITS=splits,
        K_BITS=kc["BITS"], K_CHANNEL=kc["CHANNEL"], K_GROUP=kc["GROUP"], K_RANK=kc["RANK"],
        K_RPAD=kc["RPAD"], K_OUT=kc["OUT"], K_OPAD=_pow2(ncb * kc["OUT"], 16),
        V_BITS=vc["BITS"], V_CHANNEL=vc["CHANNEL"], V_GROUP=vc["GROUP"], V_RANK=vc["RANK"],
        V_RPAD=vc["RPAD"], V_OUT=vc["OUT"], V_OPAD=_pow2(ncb * vc["OUT"], 16),
        POSITIONAL=not h2o, NSINK=nsink, F=f, BLOCK_F=min(64, _pow2(f, 16)), WINDOW=windowed,
        MASK_KIND=mask_kind, STORE_LOGITS=h2o,
        DOT="ieee" if q.dtype == torch.float32 else "tf32",
    )
    out = torch.empty(b, h, g, d, device=q.device, dtype=q.dtype)
    top = torch.empty(b, h, g, device=q.device, dtype=torch.float32)
    total = torch.empty_like(top)
    _combine_kernel[(b * h, g)](m_part, l_part, acc_part, out, top, total,
                                PARTS=parts, P_PAD=_pow2(parts), G=g, D=d)
    mass = None
    if h2o:
        mass = ((logits - top[..., None]).exp() / total[..., None]).reshape(b, hq, 1, t)
    return out.reshape(b, hq, 1, d), mass


def decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor,
    attn_mask: torch.Tensor | None, scale: float, recipe: Recipe, capacity: int,
    state: dict[str, torch.Tensor],
) -> torch.Tensor:
    """`reference.attend` for one decode token (q [B, Hq, 1, D]; k, v [B, H, 1, D]), with the
    attention in the Triton kernel: store the token, attend, and compress the window into its
    chunk slot on the step that fills it."""
    return reference.with_rotation(_decode, q, k, v, cache_position, attn_mask, scale, recipe, capacity, state)


def _decode(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state):
    if recipe.h2o is not None:
        reference.store_h2o_token(k, v, cache_position, attn_mask, recipe, capacity, state)
        out, probs = attention(q, state, recipe, capacity, cache_position, attn_mask, scale, k, v)
        scores = state["h2o.scores"]
        scores.copy_(h2o.accumulate(scores, probs, recipe.h2o.decay))
        return out
    c, kept = recipe.window, kept_dtype(recipe, q.dtype)
    real = reference.real_tokens(attn_mask, cache_position, slots(recipe, capacity)[0] * c)
    start = reference.row_starts(real, cache_position, state)
    if recipe.sinks:
        reference.write_sinks(state, k, v, cache_position, start, recipe.sinks, kept)
    for part, x in (("key", k), ("value", v)):
        state[f"window.{part}"].index_copy_(2, cache_position % c, x.to(kept))
    out, _ = attention(q, state, recipe, capacity, cache_position, attn_mask, scale, k, v)
    position = int(cache_position[0])  # which steps close a chunk is host-side control flow
    if position % c == c - 1:
        slot = cache_position // c
        skip = reference.closing_skip(slot, c, start, recipe.sinks)
        for part in ("key", "value"):
            window = state[f"window.{part}"]
            fields = reference.compress_chunk(window, getattr(recipe, part), recipe, skip)
            reference.write_slots(state, part, {f: t[:, :, None] for f, t in fields.items()}, slot)
    return out

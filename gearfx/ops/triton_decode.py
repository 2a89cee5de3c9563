"""Decode attention that reads the compressed cache directly: a Triton flash-decoding kernel.

Rebuilding fp16 keys/values before attention is slower than not compressing at all (DESIGN.md):
the speed of a compressed cache comes only from attention that reads the codes. For one decode
step (one query token per sequence), `attention` computes exactly what `reference.attend` computes
over the cache, without ever materialising K or V:

    score = q · deq(codes)ᵀ + (q · B) · Aᵀ + q[dim] · delta          (per compressed token)
    out   = p · deq(codes)  + (p · A) · Bᵀ + p[token] · delta         (per channel)

where (A, B) are each chunk's GEAR factors and delta = outlier value − what codes and factors give
there, stored so at chunk close (`gear.Chunk`): the kernel reads it as is.

The kernel is bound by instructions, not bytes (an H100 ran gear-4bit at 15x its byte floor), so
the hot loop does as little per code as it can:
- 2/4/8-bit codes are read as whole words and each code position of a byte becomes its own
  tensor-core `tl.dot` (`_scores`, `_values`). In fp16/bf16 one ALU op turns two codes into a
  float pair (`_code_tile`). A scale that varies along the dot's reduction (keys per channel,
  values per token) dequantizes the codes by one fused multiply-add a pair, in the tile; one that
  does not (keys per token, values per channel) scales the dot's fp32 result. Other widths
  gather code by code.
- A key outlier is found by binary search in its chunk's sorted indices (`_key_outliers`), a
  value outlier is added after the loop from the logits it stored (`_value_outliers`): one step
  per outlier, where one-hot products over all of a chunk's outliers cost more than the codes.
Measured without a GPU, by compiling for sm_90 and counting SASS (`bench/gpu_sass.py`).

The grid is (batch · KV heads, splits + 1): every program takes the query heads of one KV head
(GQA/MQA for free), splits walk the compressed store flash-decoding style, and the last program
attends the full-precision tokens (sinks, the window being filled). H2O has no such program: its
window's tokens and the newest one hold slots too, and the splits read them from full precision
in place of the slots' codes. A second kernel merges the splits' partial softmaxes. For H2O it
also returns the softmax normaliser so the per-slot attention mass (eviction scores) costs no
extra pass over the cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

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
    """The channel held by column c of a value tile and of the output it accumulates: 2/4-bit rows
    are read byte by byte, so columns come out interleaved (byte i's P = 8/BITS codes are channels
    i, i + D/P, ..., side by side: `_value_block`)."""
    if BITS == 2 or BITS == 4:
        return (c % (8 // BITS)) * (D * BITS // 8) + c // (8 // BITS)
    else:
        return c


@triton.constexpr_function
def _base(dtype, BITS):
    """The 16-bit float whose mantissa holds every BITS-bit code c exactly (its bits | c is the
    float base + c), as (bits, base); or None where `dtype` has 32 bits or too few mantissa bits."""
    if dtype == tl.float16:
        return 0x6400, 1024.0  # 1024 + c for c < 1024
    elif dtype == tl.bfloat16 and BITS <= 7:
        return 0x4300, 128.0  # 128 + c for c < 128
    else:
        return None


@triton.jit
def _bytes(codes, tok, ok, cb, W: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, dtype: tl.constexpr):
    """Bytes cb*W .. cb*W + W - 1 of rows tok of a store packed N bytes a row, as `_code_tile`
    reads them: for 16-bit floats, [BLOCK_T, W / 4] int32 words (4 bytes each, little-endian); else
    [BLOCK_T, W] int32, a byte each."""
    if _base(dtype, BITS) is not None:
        i = tl.arange(0, W // 4)
        words = codes.to(tl.pointer_type(tl.int32)) + tok[:, None] * (N // 4) + cb * (W // 4) + i[None, :]
        return tl.load(words, mask=ok[:, None], other=0)
    else:
        i = tl.arange(0, W)
        return tl.load(codes + tok[:, None] * N + cb * W + i[None, :], mask=ok[:, None], other=0).to(tl.int32)


@triton.jit
def _code_tile(raw, j, BITS: tl.constexpr, dtype: tl.constexpr):
    """The j-th BITS-bit code of each byte of `_bytes`'s tile, as `dtype` [BLOCK_T, W] in byte order,
    exactly. A code OR-ed into the mantissa of a float (`_base`), minus that float, costs two ALU
    ops where an int-to-float conversion runs at a quarter of their rate; for 16-bit floats one op
    does it for two bytes of a word at once (bytes 0 and 2, or 1 and 3: the halves of a pair)."""
    base: tl.constexpr = _base(dtype, BITS)
    if base is not None:
        mask: tl.constexpr = ((1 << BITS) - 1) * 0x00010001
        bits: tl.constexpr = base[0] * 0x00010001
        even = ((raw >> (j * BITS)) & mask) | bits  # bytes 0 and 2
        odd = ((raw >> (8 + j * BITS)) & mask) | bits  # bytes 1 and 3
        b0 = even.to(tl.int16).to(dtype, bitcast=True)
        b2 = (even >> 16).to(tl.int16).to(dtype, bitcast=True)
        b1 = odd.to(tl.int16).to(dtype, bitcast=True)
        b3 = (odd >> 16).to(tl.int16).to(dtype, bitcast=True)
        tile = tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), [raw.shape[0], raw.shape[1] * 4])
        return tile - base[1]
    elif dtype == tl.float32:  # 2^23 + c
        return (((raw >> (j * BITS)) & ((1 << BITS) - 1)) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    else:
        return ((raw >> (j * BITS)) & ((1 << BITS) - 1)).to(dtype)


@triton.constexpr_function
def _fast(BITS, CHANNEL, GROUP, BLOCK_T, W):
    """Whether a store is read by whole bytes, a dot per code position of a byte (`_scores`,
    `_values`): 2, 4 and 8 bits, a tile's tokens sharing one scale row when scales are per
    channel, and pieces of W >= 16 channels (a GPU dot reduces over 16 at least; the Triton
    interpreter does not check, the compiler does: `tests/test_triton.py` compiles every case)."""
    return (BITS == 2 or BITS == 4 or BITS == 8) and (not CHANNEL or BLOCK_T <= GROUP) and W >= 16


@triton.jit
def _piece_scales(scale, minimum, first, tok, t0, ok, D: tl.constexpr, W: tl.constexpr, CHANNEL: tl.constexpr,
                  GROUP: tl.constexpr):
    """(scale, minimum) fp32 of channels first .. first + W - 1 of a block's tokens tok: per
    channel, the block's scale row t0 // GROUP at those channels, [W]; per token, each token's
    group holding them (W <= GROUP channels share one), [BLOCK_T]."""
    if CHANNEL:
        meta = (t0 // GROUP) * D + first + tl.arange(0, W)
        return tl.load(scale + meta).to(tl.float32), tl.load(minimum + meta).to(tl.float32)
    else:
        meta = tok * (D // GROUP) + first // GROUP
        return (tl.load(scale + meta, mask=ok, other=0.0).to(tl.float32),
                tl.load(minimum + meta, mask=ok, other=0.0).to(tl.float32))


@triton.jit
def _key_piece(s, q_rows, byte, scale, minimum, tok, t0, ok, gm, j, cb, D: tl.constexpr, BITS: tl.constexpr,
               CHANNEL: tl.constexpr, GROUP: tl.constexpr, W: tl.constexpr, N: tl.constexpr, DOT: tl.constexpr):
    """s + the scores over channels j*N + cb*W + [0, W), the j-th code of each of bytes cb*W ..
    (torchao's layout: code j*N + i in bits j*BITS.. of byte i). A per-channel scale varies along
    the dot's reduction: the tile is dequantized by one FMA a code (rounding once, as the
    reference's cast of its fp32 reconstruction does); a per-token one scales the fp32 result.
    Folding per-channel scales into q instead costs a product and a reduction over every padded
    query row per piece, and a trip through shared memory."""
    chan = j * N + cb * W + tl.arange(0, W)
    q = tl.load(q_rows + chan[None, :], mask=gm[:, None], other=0.0)
    code = _code_tile(byte, j, BITS, q.dtype)
    sc, mn = _piece_scales(scale, minimum, j * N + cb * W, tok, t0, ok, D, W, CHANNEL, GROUP)
    if CHANNEL:
        k = tl.fma(code, sc.to(q.dtype)[None, :], mn.to(q.dtype)[None, :])
        return tl.dot(q, tl.trans(k), s, input_precision=DOT)
    else:
        dots = tl.dot(q, tl.trans(code), input_precision=DOT)
        return s + dots * sc[None, :] + tl.sum(q.to(tl.float32), axis=1)[:, None] * mn[None, :]


@triton.jit
def _scores(q_rows, codes, scale, minimum, tok, t0, ok, gm, D: tl.constexpr, BITS: tl.constexpr,
            CHANNEL: tl.constexpr, GROUP: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr,
            G_PAD: tl.constexpr, DOT: tl.constexpr):
    """Queries q_rows [G_PAD, 1] (row pointers) · the stored keys of tokens tok = t0 + [0,
    BLOCK_T)ᵀ: [G_PAD, BLOCK_T] fp32. W: bytes of a row read per dot (a per-token scale group)."""
    if _fast(BITS, CHANNEL, GROUP, BLOCK_T, W):
        N: tl.constexpr = D * BITS // 8
        s = tl.zeros([G_PAD, BLOCK_T], tl.float32)
        for cb in tl.static_range(N // W):
            byte = _bytes(codes, tok, ok, cb, W, N, BITS, q_rows.dtype.element_ty)
            for j in tl.static_range(8 // BITS):
                s = _key_piece(s, q_rows, byte, scale, minimum, tok, t0, ok, gm, j, cb, D, BITS, CHANNEL,
                               GROUP, W, N, DOT)
        return s
    else:
        d = tl.arange(0, D)
        q = tl.load(q_rows + d[None, :], mask=gm[:, None], other=0.0)
        k = _load(codes, scale, minimum, tok[:, None], d[None, :], ok[:, None], D, BITS, CHANNEL, GROUP)
        return tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT)


@triton.jit
def _value_piece(p, byte, scale, minimum, tok, t0, ok, j, cb, D: tl.constexpr, BITS: tl.constexpr,
                 CHANNEL: tl.constexpr, GROUP: tl.constexpr, W: tl.constexpr, N: tl.constexpr,
                 DOT: tl.constexpr, dtype: tl.constexpr):
    """(p [G_PAD, BLOCK_T] · the stored values of channels j*N + cb*W + [0, W))ᵀ: [W, G_PAD] fp32.
    As in `_key_piece`, per-token scales (along the reduction) dequantize the tile, per-channel ones
    scale the result."""
    code = _code_tile(byte, j, BITS, dtype)
    sc, mn = _piece_scales(scale, minimum, j * N + cb * W, tok, t0, ok, D, W, CHANNEL, GROUP)
    if CHANNEL:
        dots = tl.dot(tl.trans(code), tl.trans(p.to(dtype)), input_precision=DOT)
        return dots * sc[:, None] + tl.sum(p, axis=1)[None, :] * mn[:, None]
    else:
        v = tl.fma(code, sc.to(dtype)[:, None], mn.to(dtype)[:, None])
        return tl.dot(tl.trans(v), tl.trans(p.to(dtype)), input_precision=DOT)


@triton.jit
def _value_block(p, codes, scale, minimum, tok, t0, ok, cb, D: tl.constexpr, BITS: tl.constexpr,
                 CHANNEL: tl.constexpr, GROUP: tl.constexpr, W: tl.constexpr, G_PAD: tl.constexpr,
                 DOT: tl.constexpr, dtype: tl.constexpr):
    """(p · the stored values of bytes cb*W .. cb*W + W - 1)ᵀ: [W * 8 / BITS, G_PAD], row i*P + j
    for code j of byte i (`_perm` order)."""
    N: tl.constexpr = D * BITS // 8
    byte = _bytes(codes, tok, ok, cb, W, N, BITS, dtype)
    if BITS == 8:
        return _value_piece(p, byte, scale, minimum, tok, t0, ok, 0, cb, D, BITS, CHANNEL, GROUP, W, N, DOT, dtype)
    elif BITS == 4:
        return tl.reshape(tl.permute(tl.join(
            _value_piece(p, byte, scale, minimum, tok, t0, ok, 0, cb, D, BITS, CHANNEL, GROUP, W, N, DOT, dtype),
            _value_piece(p, byte, scale, minimum, tok, t0, ok, 1, cb, D, BITS, CHANNEL, GROUP, W, N, DOT, dtype)),
            (0, 2, 1)), [2 * W, G_PAD])
    else:  # join(join(0, 2), join(1, 3)) [W, G_PAD, a, b] holds code 2a + b: row i*4 + j
        return tl.reshape(tl.permute(tl.join(
            tl.join(_value_piece(p, byte, scale, minimum, tok, t0, ok, 0, cb, D, BITS, CHANNEL, GROUP, W, N, DOT, dtype),
                    _value_piece(p, byte, scale, minimum, tok, t0, ok, 2, cb, D, BITS, CHANNEL, GROUP, W, N, DOT, dtype)),
            tl.join(_value_piece(p, byte, scale, minimum, tok, t0, ok, 1, cb, D, BITS, CHANNEL, GROUP, W, N, DOT, dtype),
                    _value_piece(p, byte, scale, minimum, tok, t0, ok, 3, cb, D, BITS, CHANNEL, GROUP, W, N, DOT, dtype))),
            (0, 2, 3, 1)), [4 * W, G_PAD])


@triton.jit
def _values(p, codes, scale, minimum, tok, t0, ok, D: tl.constexpr, BITS: tl.constexpr, CHANNEL: tl.constexpr,
            GROUP: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr,
            DOT: tl.constexpr, dtype: tl.constexpr):
    """(p [G_PAD, BLOCK_T] · the stored values of tokens tok)ᵀ: [D, G_PAD] fp32, rows in `_perm`
    order. W: bytes of a row read per dot (a per-token scale group); the fast path takes one or two
    such blocks a row, else the values are gathered code by code. Transposed, the dot has head_dim
    rows, which on Hopper makes it a warpgroup MMA fed from shared memory: as the second operand
    of an mma.sync, the value tile cost register moves before every MMA (one in ten of the loop's
    instructions)."""
    N: tl.constexpr = D * BITS // 8
    if _fast(BITS, CHANNEL, GROUP, BLOCK_T, W) and N // W <= 2:
        if N // W == 1:
            return _value_block(p, codes, scale, minimum, tok, t0, ok, 0, D, BITS, CHANNEL, GROUP, W, G_PAD, DOT, dtype)
        else:  # [block 0, block 1] along rows
            both = tl.join(
                _value_block(p, codes, scale, minimum, tok, t0, ok, 0, D, BITS, CHANNEL, GROUP, W, G_PAD, DOT, dtype),
                _value_block(p, codes, scale, minimum, tok, t0, ok, 1, D, BITS, CHANNEL, GROUP, W, G_PAD, DOT, dtype))
            return tl.reshape(tl.permute(both, (2, 0, 1)), [D, G_PAD])
    else:
        cols = _perm(tl.arange(0, D), D, BITS)
        v = _load(codes, scale, minimum, tok[:, None], cols[None, :], ok[:, None], D, BITS, CHANNEL, GROUP)
        return tl.dot(tl.trans(v.to(dtype)), tl.trans(p.to(dtype)), input_precision=DOT)


@triton.jit
def _first_at_or_after(index, key, ok, K: tl.constexpr, K_PAD: tl.constexpr):
    """For each key [N]: the first j in 0..K with index[j] >= key, index [K] ascending (a chunk's
    outlier indices, `sparse.select`), by a binary search of log2(K_PAD) + 1 steps."""
    base = tl.zeros(key.shape, tl.int32)
    for i in tl.static_range(K_PAD.bit_length()):
        half = K_PAD >> i
        inside = ok & (base + half - 1 < K)
        probe = tl.load(index + base + half - 1, mask=inside, other=0).to(tl.int32)
        base = tl.where(inside & (probe < key), base + half, base)
    return base


@triton.jit
def _key_outliers(s, q_rows, delta, index, tok, ok, gm, D: tl.constexpr, C: tl.constexpr, K: tl.constexpr,
                  K_PAD: tl.constexpr, G_ROWS: tl.constexpr):
    """s [G_PAD, BLOCK_T] + q[chan] · delta of every key outlier of tokens tok (ok: read from
    codes). A chunk's outliers are sorted by flat index, so a token's are the run that starts
    where a binary search puts it: the work is a step per outlier of the block's densest token,
    where a one-hot product over all of the chunk's outliers costs as much as the codes."""
    first = (tok // C) * K  # the token's chunk's first outlier
    row = (tok % C) * D  # flat index of the token's first entry in its chunk
    j = first + _first_at_or_after(index + first, row, ok, K, K_PAD)
    more = ok & (j < first + K)
    flat = tl.load(index + j, mask=more, other=0).to(tl.int32)
    more = more & (flat < row + D)
    corr = tl.zeros([G_ROWS, tok.shape[0]], tl.float32)
    while tl.max(more.to(tl.int32), axis=0) > 0:
        d = tl.load(delta + j, mask=more, other=0.0).to(tl.float32)
        if G_ROWS == 1:  # MHA: one query row, not G_PAD
            qo = tl.load(q_rows + (flat % D)[None, :], mask=more[None, :], other=0.0).to(tl.float32)
        else:
            qo = tl.load(q_rows + (flat % D)[None, :], mask=gm[:, None] & more[None, :], other=0.0).to(tl.float32)
        corr += qo * d[None, :]
        j += 1
        more = more & (j < first + K)
        flat = tl.load(index + j, mask=more, other=0).to(tl.int32)
        more = more & (flat < row + D)
    return s + corr


@triton.jit
def _value_outliers(ACC, LOGITS, delta, index, POS, m, bh, part, start, end, cpos, g, gm, T,
                    G: tl.constexpr, D: tl.constexpr, C: tl.constexpr, K: tl.constexpr, F: tl.constexpr,
                    POSITIONAL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Add p[token] · delta at each value outlier's channel of tokens start .. end - 1 to this
    program's stored partial output ACC [G, D] (channel order), after the main loop: p = exp(logit -
    m) from the logits it stored, so the outliers cost a step each instead of two one-hot products
    per block. Tokens read from full precision (H2O's window) have none."""
    m_use = tl.where(m == float("-inf"), 0.0, m)
    first = (start // C) * K
    last = tl.cdiv(end, C) * K
    for j0 in range(first, last, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        ok = j < last
        flat = tl.load(index + j, mask=ok, other=0).to(tl.int32)
        tok = (j // K) * C + flat // D
        ok = ok & (tok >= start) & (tok < end)
        if not POSITIONAL:
            posn = tl.load(POS + bh * T + tok, mask=ok, other=-1)
            ok = ok & (posn <= cpos - F)
        d = tl.load(delta + j, mask=ok, other=0.0).to(tl.float32)
        both = gm[:, None] & ok[None, :]
        logit = tl.load(LOGITS + (bh * G + g[:, None]) * T + tok[None, :], mask=both, other=float("-inf"))
        contribution = tl.exp(logit - m_use[:, None]) * d[None, :]
        tl.atomic_add(ACC + (part * G + g[:, None]) * D + (flat % D)[None, :], contribution, mask=both)


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
def _window_tile(W, FRESH, bh, posn, cpos, exact, cols, F: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr):
    """H2O: the slots of a tile at positions posn that the full-precision window holds (`exact`:
    the F newest positions, position p at row p % F of W [F, D]), read from there, and this step's
    token from FRESH [D], in the model's precision: [BLOCK_T, D] fp32 (columns `cols`), 0 in the
    other rows."""
    x = tl.zeros([posn.shape[0], D], tl.float32)
    if WINDOW:
        x = tl.load(W + (bh * F + posn % F)[:, None] * D + cols[None, :], mask=exact[:, None], other=0.0).to(tl.float32)
    fresh = tl.load(FRESH + bh * D + cols).to(tl.float32)
    return tl.where((posn == cpos)[:, None], fresh[None, :], x)


@triton.jit
def _online(s, m_i, l_i):
    """One flash-attention step: scores s [G, N] (-inf where masked) -> (p, m, l, and alpha [G],
    the factor that rescales the accumulator)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_use)
    p = tl.exp(s - m_use[:, None])
    return p, m_new, l_i * alpha + tl.sum(p, axis=1), alpha


@triton.jit
def _decode_kernel(
    Q, KC, KS, KM, KA, KB, KOD, KOI, VC, VS, VM, VA, VB, VOD, VOI,
    WK, WV, FK, FV, SK, SV, START, MASK, POS, CPOS,
    M_OUT, L_OUT, ACC_OUT, LOGITS,
    sm_scale, T, mask_stride, split_len,
    H: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_T: tl.constexpr, C: tl.constexpr, SPLITS: tl.constexpr,
    K_BITS: tl.constexpr, K_CHANNEL: tl.constexpr, K_GROUP: tl.constexpr, K_W: tl.constexpr, K_RANK: tl.constexpr,
    K_RPAD: tl.constexpr, K_OUT: tl.constexpr, K_OPAD: tl.constexpr,
    V_BITS: tl.constexpr, V_CHANNEL: tl.constexpr, V_GROUP: tl.constexpr, V_W: tl.constexpr, V_RANK: tl.constexpr,
    V_RPAD: tl.constexpr, V_OUT: tl.constexpr,
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
        q_head = Q + bh * G * D
        q_rows = q_head + g[:, None] * D
        sinks = tl.load(START + b).to(tl.int32) if NSINK > 0 else 0  # the row's first sink
        acc_t = tl.zeros([D, G_PAD], tl.float32)  # transposed, as `_values` returns it
        # two stages: the next block's loads are in flight while this one computes; a third
        # buffers more tiles in shared memory and, for full-precision or 3-bit stores, fits fewer
        # programs on an SM (compact at head_dim 128: 124 KB with three, 74 KB with two)
        for t0 in tl.range(start, end, BLOCK_T, num_stages=2):
            tok = t0 + tl.arange(0, BLOCK_T)
            inside = tok < end
            if POSITIONAL:
                posn = tok
                ok = inside & (tok < closed)
                if NSINK > 0:  # the row's sinks are attended from the sink buffer
                    ok = ok & ((tok < sinks) | (tok >= sinks + NSINK))
            else:  # H2O slots: a position per slot, -1 when empty
                posn = tl.load(POS + bh * T + tok, mask=inside, other=-1)
                ok = inside & (posn >= 0)
                # read from full precision (`_window_tile`): the window's F newest positions (F = 1
                # without a window: this step's)
                exact = ok & (posn > cpos - F)
                windowed = tl.max(exact.to(tl.int32), axis=0) > 0
            bias = _mask_bias(mask_row, posn, ok, MASK_KIND)
            s = _scores(q_rows, kc, ks, km, tok, t0, ok, gm, D, K_BITS, K_CHANNEL, K_GROUP, K_W, BLOCK_T, G_PAD, DOT)
            chunk = t0 // C
            if K_RANK > 0:  # (q · B) · Aᵀ of this block's chunk
                r = tl.arange(0, K_RPAD)
                bk = tl.load(KB + ((bh * nchunks + chunk) * D + d[:, None]) * K_RANK + r[None, :],
                             mask=r[None, :] < K_RANK, other=0.0)
                ak = tl.load(KA + (bh * T + tok[:, None]) * K_RANK + r[None, :],
                             mask=inside[:, None] & (r[None, :] < K_RANK), other=0.0)
                qb = tl.dot(q, bk.to(q.dtype), input_precision=DOT)
                s = tl.dot(qb.to(q.dtype), tl.trans(ak.to(q.dtype)), s, input_precision=DOT)
            if K_OUT > 0:  # q[chan] · delta at each outlier's token
                s = _key_outliers(s, q_head if G == 1 else q_rows, KOD + bh * nchunks * K_OUT,
                                  KOI + bh * nchunks * K_OUT, tok, ok, gm, D, C, K_OUT, K_OPAD, 1 if G == 1 else G_PAD)
            if not POSITIONAL:
                if windowed:  # those tokens' scores come from full precision, without corrections
                    kw = _window_tile(WK, FK, bh, posn, cpos, exact, d, F, D, WINDOW)
                    s = tl.where(exact[None, :], tl.dot(q, tl.trans(kw.to(q.dtype)), input_precision=DOT), s)
            s = s * sm_scale + bias[None, :]
            if STORE_LOGITS:  # -inf where masked (H2O's empty slots)
                tl.store(LOGITS + (bh * G + g[:, None]) * T + tok[None, :], s, mask=gm[:, None] & inside[None, :])
            p, m_i, l_i, alpha = _online(s, m_i, l_i)
            acc_t = acc_t * alpha[None, :]
            if not POSITIONAL:  # the stored values' share: the window's tokens are read below
                pw = p
                p = tl.where(exact[None, :], 0.0, p)
            acc_t += _values(p, vc, vs, vm, tok, t0, ok, D, V_BITS, V_CHANNEL, V_GROUP, V_W, BLOCK_T, G_PAD, DOT,
                             q.dtype)
            if V_RANK > 0:  # B · (p · A)ᵀ
                r = tl.arange(0, V_RPAD)
                bv = tl.load(VB + ((bh * nchunks + chunk) * D + vperm[:, None]) * V_RANK + r[None, :],
                             mask=r[None, :] < V_RANK, other=0.0)
                av = tl.load(VA + (bh * T + tok[:, None]) * V_RANK + r[None, :],
                             mask=inside[:, None] & (r[None, :] < V_RANK), other=0.0)
                pa = tl.dot(tl.trans(av.to(q.dtype)), tl.trans(p.to(q.dtype)), input_precision=DOT)
                acc_t = tl.dot(bv.to(q.dtype), pa.to(q.dtype), acc_t, input_precision=DOT)
            if not POSITIONAL:
                if windowed:
                    vw = _window_tile(WV, FV, bh, posn, cpos, exact, vperm, F, D, WINDOW)
                    pe = tl.where(exact[None, :], pw, 0.0)
                    acc_t += tl.dot(tl.trans(vw.to(q.dtype)), tl.trans(pe.to(q.dtype)), input_precision=DOT)
        acc = tl.trans(acc_t)
    else:  # the full-precision tokens of a positional cache: sinks, then the window being filled
        # (one program a row: unpipelined, so its loads take no shared memory from the others)
        i = tl.arange(0, BLOCK_F)
        first = cpos // C * C  # position of the window's first token
        if NSINK > 0:
            row_start = tl.load(START + b)
            for f0 in tl.range(0, NSINK, BLOCK_F, num_stages=1):
                posn = row_start + f0 + i
                ok = (f0 + i < NSINK) & (posn < first)  # the window holds the later ones
                bias = _mask_bias(mask_row, posn, ok, MASK_KIND)
                rows = (bh * NSINK + f0 + i)[:, None] * D + d[None, :]
                k = tl.load(SK + rows, mask=ok[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT) * sm_scale + bias[None, :]
                p, m_i, l_i, alpha = _online(s, m_i, l_i)
                v = tl.load(SV + rows, mask=ok[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT)
        for f0 in tl.range(0, F, BLOCK_F, num_stages=1):
            posn = first + f0 + i
            ok = (f0 + i < F) & (posn <= cpos)
            bias = _mask_bias(mask_row, posn, ok, MASK_KIND)
            rows = (bh * F + f0 + i)[:, None] * D + d[None, :]
            # this step's token in the model's precision, not the window's 16 bits
            newest = (posn == cpos)[:, None]
            k = tl.load(WK + rows, mask=ok[:, None], other=0.0).to(tl.float32)
            k = tl.where(newest, tl.load(FK + bh * D + d).to(tl.float32)[None, :], k)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT) * sm_scale + bias[None, :]
            p, m_i, l_i, alpha = _online(s, m_i, l_i)
            acc = acc * alpha[:, None]
            v = tl.load(WV + rows, mask=ok[:, None], other=0.0).to(tl.float32)
            v = tl.where(newest, tl.load(FV + bh * D + d).to(tl.float32)[None, :], v)
            acc += tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT)
    part = bh * tl.num_programs(1) + split  # H2O has no full-precision program
    cols = tl.where(split < SPLITS, vperm, d)  # compressed values accumulate in tile order
    tl.store(M_OUT + part * G + g, m_i, mask=gm)
    tl.store(L_OUT + part * G + g, l_i, mask=gm)
    tl.store(ACC_OUT + (part * G + g[:, None]) * D + cols[None, :], acc, mask=gm[:, None])
    if V_OUT > 0:
        if split < SPLITS:
            tl.debug_barrier()  # the stores above are visible to every thread of the program
            _value_outliers(ACC_OUT, LOGITS, VOD + bh * nchunks * V_OUT, VOI + bh * nchunks * V_OUT, POS, m_i,
                            bh, part, split * split_len, tl.minimum(split * split_len + split_len, T), cpos,
                            g, gm, T, G, D, C, V_OUT, F, POSITIONAL, 64)


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
    block must sit inside one chunk when there are low-rank factors (one B per block), and inside
    one scale row of a per-channel store (`_fast`: one scale row a tile)."""
    ranked = any(s.quantized and s.resolve_rank(chunk) for s in (recipe.key, recipe.value))
    rows = [s.group for s in (recipe.key, recipe.value) if s.quantized and s.axis == "channel"]
    block = 64
    while block > 16 and ((chunk % block and (ranked or block % chunk)) or any(block > r for r in rows)):
        block //= 2
    return block


def _part(state: dict[str, torch.Tensor], part: str, spec: TensorSpec, chunk: int, dummy: torch.Tensor):
    """Pointers and constants of one store (key or value) for the kernel."""
    get = lambda f: state.get(f"{part}.{f}", dummy)  # noqa: E731 (absent fields are never read)
    rank = spec.resolve_rank(chunk) if spec.quantized else 0
    k = spec.num_outliers(chunk, dummy.shape[-1]) if spec.quantized else 0
    tensors = (get("codes") if spec.quantized else state[f"{part}.data"], get("scale"), get("minimum"),
               get("a"), get("b"), get("outlier_delta"), get("outlier_index"))
    bits, channel, group = spec.bits, spec.axis == "channel", spec.group if spec.quantized else 1
    row = dummy.shape[-1] * bits // 8  # bytes of a packed row
    consts = dict(BITS=bits, CHANNEL=channel, GROUP=group, W=row if channel else min(row, group),
                  RANK=rank, RPAD=_pow2(rank, 16), OUT=k)  # a dot's inner size is at least 16
    return tensors, consts


class Launch(NamedTuple):
    """One decode step's `_decode_kernel` launch: its grid, arguments and constants, and the
    buffers it writes (each split's m, l and accumulator; the logits, or q as a placeholder)."""

    grid: tuple[int, int]
    args: tuple
    constants: dict
    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor
    logits: torch.Tensor


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
    run = launch(q, state, recipe, capacity, cache_position, attn_mask, scale, fresh_k, fresh_v, splits)
    _decode_kernel[run.grid](*run.args, **run.constants)
    bh, parts, g = run.m.shape
    out = torch.empty(bh, g, d, device=q.device, dtype=q.dtype)
    top = torch.empty(bh, g, device=q.device, dtype=torch.float32)
    total = torch.empty_like(top)
    _combine_kernel[(bh, g)](run.m, run.l, run.acc, out, top, total, PARTS=parts, P_PAD=_pow2(parts), G=g, D=d)
    mass = None
    if recipe.h2o is not None:
        mass = ((run.logits.flatten(0, 1) - top[..., None]).exp() / total[..., None]).reshape(b, hq, 1, -1)
    return out.reshape(b, hq, 1, d), mass


def launch(q, state, recipe, capacity, cache_position, attn_mask, scale, fresh_k, fresh_v, splits=None) -> Launch:
    """The kernel launch of `attention` (same arguments), without running it."""
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
    store_logits = h2o or vc["OUT"] > 0  # H2O's attention mass; the value outliers' probabilities
    logits = torch.empty(b, h, g, t, device=q.device) if store_logits else q  # every split writes its tokens
    args = (q.reshape(b, h, g, d).contiguous(), *kt, *vt, window_k, window_v, fresh_k, fresh_v, *sinks,
            state["row.start"], mask, positions, cache_position, m_part, l_part, acc_part, logits,
            scale, t, mask_stride, split_len)
    constants = dict(
        H=h, G=g, G_PAD=g_pad, D=d, BLOCK_T=block, C=c, SPLITS=splits,
        K_BITS=kc["BITS"], K_CHANNEL=kc["CHANNEL"], K_GROUP=kc["GROUP"], K_W=kc["W"], K_RANK=kc["RANK"],
        K_RPAD=kc["RPAD"], K_OUT=kc["OUT"], K_OPAD=_pow2(kc["OUT"]),
        V_BITS=vc["BITS"], V_CHANNEL=vc["CHANNEL"], V_GROUP=vc["GROUP"], V_W=vc["W"], V_RANK=vc["RANK"],
        V_RPAD=vc["RPAD"], V_OUT=vc["OUT"],
        POSITIONAL=not h2o, NSINK=nsink, F=f, BLOCK_F=min(64, _pow2(f, 16)), WINDOW=windowed,
        MASK_KIND=mask_kind, STORE_LOGITS=store_logits,
        DOT="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return Launch((b * h, parts), args, constants, m_part, l_part, acc_part, logits)


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
    real = reference.real_tokens(attn_mask, cache_position)
    start = reference.row_starts(real, cache_position, state)
    if recipe.sinks:
        reference.write_sinks(state, k, v, cache_position, start, recipe.sinks, kept)
    for part, x in (("key", k), ("value", v)):
        state[f"window.{part}"].index_copy_(2, cache_position % c, x.to(kept))
    out, _ = attention(q, state, recipe, capacity, cache_position, attn_mask, scale, k, v)
    if reference.closes_chunk(cache_position, recipe, capacity):  # host-side control flow
        slot = cache_position // c
        skip = reference.closing_skip(slot, c, start, recipe.sinks)
        for part in ("key", "value"):
            reference.close_window(state, part, recipe, slot, skip)
    return out

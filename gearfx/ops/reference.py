"""Attention over a compressed KV cache, in plain PyTorch: the reference and the CPU/export path.

`attend` does what the model's cache write + attention did, on the recipe's state tensors
(see `gearfx.compress.layout`): it stores the new keys/values at `cache_position` and returns the
attention output of `q` over everything cached so far, under the model's own mask.

Every shape is static (capacity, chunk slots, H2O slots), so a decode step compiles once:
- Without eviction the cache is positional: sequence position p lives in chunk slot p // window.
  The chunk being filled is read from the full-precision window; earlier chunks from their
  compressed form. The decode step that fills the window compresses it into its slot: traced,
  a `torch.cond`, so other steps skip the work and the graph stays one graph; the compiled
  site kernels are told on the host instead (`closes`), one kernel for each case.
- The new tokens are always attended in full precision: prefill is exact over the prompt.
- With `sinks: N`, each row's first N real tokens (`gearfx.compress.sinks`: after its left
  padding) are also kept in sink.key / sink.value and attended from there, exactly (no
  corrections); their chunk is still compressed whole, with those tokens left out of its ranges,
  outliers and low-rank fit. A row's padding is left out the same way, so padding never reaches
  the compression of the row's tokens.
- With `rotate`, q, k and v are rotated by the recipe's fixed orthogonal matrix on the way in and
  the output rotated back on the way out (`gearfx.compress.rotation`): everything in between,
  the cache included, works on rotated tensors and is otherwise unchanged.
- With H2O, slots hold single tokens at arbitrary positions; the op builds its mask by gathering
  the model's mask at each slot's position, and adds the step's attention to the slot scores.
  A compressing H2O cache also keeps its `window` newest tokens in full precision (they are
  among the recent ones, so they also hold slots) and attends them from there, as GEAR and KIVI
  attend their streaming window.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from gearfx.compress import gear, h2o, rotation
from gearfx.compress.gear import Chunk
from gearfx.compress.layout import kept_dtype, slots
from gearfx.compress.sinks import held_elsewhere, is_sink, sink_positions
from gearfx.ops import codes
from gearfx.recipes import Recipe, TensorSpec

FIELDS = Chunk._fields


def compress_chunk(x: torch.Tensor, spec: TensorSpec, recipe: Recipe,
                   skip: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """x [..., T, D] (already in the cache's kept dtype) -> the state fields of one compressed
    chunk per leading index; skip: tokens kept exactly elsewhere (`gear.compress`)."""
    if not spec.quantized:
        return {"data": x}
    c = gear.compress(x, spec, recipe.loops, recipe.seed, skip)
    return {f: t for f, t in c._asdict().items() if t is not None}


def _chunk(state: dict[str, torch.Tensor], part: str) -> Chunk:
    """The compressed store of `part` ("key" or "value"): every slot's fields, [B, H, N, ...]."""
    return Chunk(*(state.get(f"{part}.{f}") for f in FIELDS))


class Corrections(NamedTuple):
    """GEAR's corrections of a compressed store, applied in factored form: attention adds them to
    scores and outputs without rebuilding the full-precision keys and values.

    a [B, H, N, C, r], b [B, H, N, D, r]: low-rank factors of each chunk (or None);
    delta [B, H, N*k]: the stored outlier deltas (`gear.Chunk`) (or None), at token
    position pos [B, H, N*k] (in 0..N*C) and channel dim [B, H, N*k]; pos is None when every
    chunk is one token (H2O's slots): chunk n's k outliers are then entries n*k.. of delta, and a
    token's score correction is a sum over them instead of a scatter. tokens = N*C; head_dim = D.
    """

    a: torch.Tensor | None
    b: torch.Tensor | None
    delta: torch.Tensor | None
    pos: torch.Tensor | None
    dim: torch.Tensor | None
    tokens: int
    head_dim: int

    def scores(self, q5: torch.Tensor) -> torch.Tensor:
        """Correction of q5 [B, H, g, L, D] @ K^T: [B, H, g, L, N*C]."""
        bb, h, g, length, _ = q5.shape
        out = q5.new_zeros(())
        if self.a is not None:  # (q . b) . a^T, per chunk
            qb = torch.einsum("bhgld,bhndr->bhglnr", q5, self.b)
            out = torch.einsum("bhglnr,bhncr->bhglnc", qb, self.a).flatten(-2)
        if self.delta is not None:  # q[dim] * delta, added at each outlier's token
            shape = (bb, h, g, length, self.delta.shape[-1])
            qd = q5.gather(-1, self.dim[:, :, None, None].expand(shape)) * self.delta[:, :, None, None]
            if self.pos is None:
                return out + qd.view(*shape[:-1], self.tokens, -1).sum(-1)
            zeros = qd.new_zeros(*shape[:-1], self.tokens)
            out = out + zeros.scatter_add(-1, self.pos[:, :, None, None].expand(shape), qd)
        return out

    def output(self, probs: torch.Tensor) -> torch.Tensor:
        """Correction of probs [B, H, g, L, N*C] @ V: [B, H, g, L, D]."""
        bb, h, g, length, _ = probs.shape
        out = probs.new_zeros(bb, h, g, length, self.head_dim)
        if self.a is not None:  # (p . a) . b^T, per chunk
            n, c = self.a.shape[2:4]
            pa = torch.einsum("bhglnc,bhncr->bhglnr", probs.view(bb, h, g, length, n, c), self.a)
            out = out + torch.einsum("bhglnr,bhndr->bhgld", pa, self.b)
        if self.delta is not None:  # p[token] * delta, added at each outlier's channel
            shape = (bb, h, g, length, self.delta.shape[-1])
            if self.pos is None:
                at = probs[..., None].expand(*shape[:-1], self.tokens, shape[-1] // self.tokens).flatten(-2)
            else:
                at = probs.gather(-1, self.pos[:, :, None, None].expand(shape))
            out = out.scatter_add(-1, self.dim[:, :, None, None].expand(shape), at * self.delta[:, :, None, None])
        return out


def _corrections(c: Chunk, spec: TensorSpec) -> Corrections | None:
    """The factored corrections of a compressed store (None without factors or outliers)."""
    if c.a is None and c.outlier_index is None:
        return None
    n, t = c.codes.shape[2:4]
    d = c.scale.shape[-1] * (1 if spec.axis == "channel" else spec.group)
    a = b = delta = pos = dim = None
    if c.a is not None:
        a, b = c.a.float(), c.b.float()
    if c.outlier_index is not None:
        idx = c.outlier_index.long()  # [B, H, N, k] flat in each chunk's T x D
        if t == 1:  # the flat index into a one-token chunk is the channel
            dim = idx.flatten(2)
        else:
            row, dim = divmod_int(idx, d)
            pos, dim = (row + torch.arange(n, device=idx.device)[:, None] * t).flatten(2), dim.flatten(2)
        delta = c.outlier_delta.float().flatten(2)
    return Corrections(a, b, delta, pos, dim, n * t, d)


def divmod_int(x: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x // d, x % d) of a non-negative integer tensor. A power-of-two d goes as a shift and a
    mask: Inductor's C++ backend vectorizes those but divides integers one element at a time
    (SmolLM2 layer, 4-bit H2O decode over 1940 slots: the outlier corrections took 600 us with
    // and %, 150 us as shift and mask)."""
    if d & (d - 1):
        return x // d, x % d
    return x >> (d.bit_length() - 1), x & (d - 1)


def close_window(state, part: str, recipe: Recipe, slot: torch.Tensor, skip: torch.Tensor | None) -> None:
    """Compress the full window of `part` into its chunk's slot [1] (skip: `closing_skip`)."""
    fields = compress_chunk(state[f"window.{part}"], getattr(recipe, part), recipe, skip)
    write_slots(state, part, {f: t[:, :, None] for f, t in fields.items()}, slot)


def write_slots(state, part: str, fields: dict[str, torch.Tensor], index: torch.Tensor) -> None:
    """state[part.field][:, :, index] = fields[field] for every field (slot dim 2)."""
    for f, t in fields.items():
        state[f"{part}.{f}"].index_copy_(2, index, t.to(state[f"{part}.{f}"].dtype))


def _tracing(t: torch.Tensor) -> bool:
    """Whether this runs under a tracer (dynamo, export, make_fx), not on real tensors."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def closes_chunk(cache_position: torch.Tensor, recipe: Recipe, capacity: int) -> bool:
    """Whether a decode step at cache_position [1] fills the streaming window, which then is
    compressed into its chunk's slot. On the host, outside any trace."""
    if recipe.h2o is not None or not recipe.compresses:
        return False
    c = slots(recipe, capacity)[1]
    return bool(cache_position[0] % c == c - 1)


def _starts_sequence(cache_position: torch.Tensor) -> bool:
    """Whether these tokens are a sequence's first (from position 0), read on the host: they then
    attend only to each other, every later position being masked, so attention can leave out the
    rest of the cache. In eager code only: a traced program serves any position, and under
    torch.compile the read splits the graph, after which compiled decode steps went wrong
    (SmolLM2 gear-4bit: same prefill logits, different tokens from the third on)."""
    return not _tracing(cache_position) and bool(cache_position[0] == 0)


def plain_causal(attn_mask: torch.Tensor, length: int) -> bool:
    """Whether attn_mask [B|1, 1|Hq, L, >= L], over its first L keys, is exactly the causal mask
    (no padding, no sliding window, no bias), read on the host. A sequence's first tokens then
    attend with SDPA's is_causal instead, which skips the masked half of the scores: 2.2x faster
    at 4000 tokens, with the same outputs bit for bit."""
    if attn_mask.shape[-2] != length or attn_mask.shape[-1] < length:  # a broadcast row is no causal mask
        return False
    mask = attn_mask[..., :length, :length]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril_().expand(mask.shape)
    if mask.dtype == torch.bool:
        return torch.equal(mask, causal)
    masked = torch.finfo(mask.dtype).min / 2
    return bool(torch.where(causal, mask == 0, mask <= masked).all())


def causal_if_plain(attn_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """For the L = length tokens that start a sequence: None (plain causal attention) if their
    mask is plain causal (`plain_causal`), else attn_mask. On the host, outside any trace."""
    return None if attn_mask is None or plain_causal(attn_mask, length) else attn_mask


def _sdpa_gqa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """SDPA of q [B, Hq, L, D] over keys, values [B, H, T, D] (Hq = g * H: query head j reads
    KV head j // g) under mask [B|1, 1|Hq, L, T], bool (True = attend) or additive, or None:
    causal (query i attends keys 0 .. i, T = L). Returns [B, Hq, L, D].

    One SDPA per query head of each KV head, all reading the same keys and values, rather than
    keys and values repeated per query head ([B, Hq, T, D] each, over a whole prompt) or the mask
    repeated per head (if the g heads were folded into the query rows)."""
    g = q.shape[1] // keys.shape[1]
    causal = mask is None
    if g == 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, scale=scale)
    # SDPA makes a bool mask additive (-inf) on every call: made so once here, in eager. Not when
    # tracing: exported to ONNX, the additive mask gives NaN on fully masked rows (left padding),
    # which reach the real tokens through the pad positions' values; the bool one does not
    if not causal and mask.dtype == torch.bool and not _tracing(q):
        mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    out = q.new_empty(q.shape)  # written head by head: a stack would hold every head's output twice
    for i in range(g):  # query heads i, g + i, 2g + i, ...: the i-th of each KV head
        heads = mask if causal or mask.shape[1] == 1 else mask[:, i::g]
        out[:, i::g] = F.scaled_dot_product_attention(q[:, i::g], keys, values, attn_mask=heads, is_causal=causal,
                                                      scale=scale)
    return out


def _bias(attn_mask: torch.Tensor | None, cache_position: torch.Tensor, keys: int, dtype) -> torch.Tensor:
    """Additive mask [B or 1, 1 or Hq, L, keys] over sequence positions 0..keys-1.

    attn_mask: the model's mask over its own cache positions, bool (True = attend) or additive,
    or None for plain causal attention. Positions past the model's mask (chunk padding) are masked.
    """
    neg = torch.finfo(dtype).min
    if attn_mask is None:
        allowed = torch.arange(keys, device=cache_position.device) <= cache_position[:, None]
        return torch.zeros((), dtype=dtype, device=cache_position.device).masked_fill(~allowed, neg)[None, None]
    bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(
        (), dtype=dtype, device=attn_mask.device).masked_fill(~attn_mask, neg)
    bias = bias.to(dtype)
    pad = keys - bias.shape[-1]
    return F.pad(bias, (0, pad), value=neg) if pad else bias


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor,
    attn_mask: torch.Tensor | None, scale: float, recipe: Recipe, capacity: int,
    state: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Store k, v at `cache_position` and attend.

    q [B, Hq, L, D]; k, v [B, H, L, D] (Hq a multiple of H); cache_position [L] int64, the new
    tokens' positions; attn_mask [B, 1, L, capacity] (bool or additive) or None (causal);
    state: the layer's state tensors by layout name, updated in place. Returns [B, Hq, L, D].
    """
    return with_rotation(attend_rotated, q, k, v, cache_position, attn_mask, scale, recipe, capacity, state)


def with_rotation(attend_fn, q, k, v, cache_position, attn_mask, scale, recipe, capacity, state):
    """attend_fn(q, k, v, ...) with the recipe's rotation around it, if it has one."""
    if not recipe.rotate:
        return attend_fn(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state)
    # orthogonal: attention over rotated q, k, v is the same attention
    if _tracing(q):  # built in the graph from aranges (export needs no constant)
        r = rotation.matrix(q.shape[-1], recipe.seed, q.device)
    else:
        r = _rotation_matrix(q.shape[-1], recipe.seed, q.device)
    q, k, v = (rotation.rotate(x, r) for x in (q, k, v))
    out = attend_fn(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state)
    return rotation.unrotate(out, r)


@lru_cache(maxsize=None)
def _rotation_matrix(head_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    return rotation.matrix(head_dim, seed, device)


def attend_rotated(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state, starts=None, closes=None):
    """`attend` without the recipe's rotation: q, k, v are already rotated (`with_rotation`).
    starts: whether the tokens start a sequence, closes: whether a decode step closes a chunk
    (`closes_chunk`), when the caller knows it outside a trace (`ops._compiled`); None: asked
    here, on the host when eager, by `torch.cond` when traced."""
    if starts is None and k.shape[2] > 1:  # a prefill's question: decode steps never read it
        starts = _starts_sequence(cache_position)
        if starts:
            attn_mask = causal_if_plain(attn_mask, k.shape[2])
    if recipe.h2o is not None:
        return _attend_h2o(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state)
    if not recipe.compresses:
        kc, vc = state["key.data"], state["value.data"]
        kc.index_copy_(2, cache_position, k)
        vc.index_copy_(2, cache_position, v)
        b, h, length, d = k.shape
        g = q.shape[1] // h
        if starts:  # None stays None: causal
            return _sdpa_gqa(q, kc[:, :, :length], vc[:, :, :length],
                             None if attn_mask is None else attn_mask[..., :length], scale)
        mask = attn_mask if attn_mask is not None else _bias(None, cache_position, capacity, q.dtype)
        if length == 1:  # a KV head's g queries as g rows: no repeated copy of the cache (5x faster on CPU)
            mask = mask[:, :, 0]  # [B|1, 1|Hq, capacity]
            mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], h, g, capacity)
            out = F.scaled_dot_product_attention(q.reshape(b, h, g, d), kc, vc, attn_mask=mask, scale=scale)
            return out.reshape(b, h * g, 1, d)
        return _sdpa_gqa(q, kc, vc, mask, scale)
    return _attend_chunked(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state, starts, closes)


def _attend_chunked(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state, starts, closes):
    b, h, length, d = k.shape
    n, c = slots(recipe, capacity)
    kept = kept_dtype(recipe, q.dtype)
    first = cache_position[:1] // c  # the chunk the window holds before this call
    start = row_starts(real_tokens(attn_mask, cache_position), cache_position, state)
    if recipe.sinks:  # this call's tokens that are sinks join the sink buffer, read from there
        write_sinks(state, k, v, cache_position, start, recipe.sinks, kept)
    if length == 1:
        out = _attend_one(q, k, v, cache_position, start, attn_mask, scale, recipe, capacity, state)
    else:
        out, base = _attend_many(q, k, v, cache_position, start, attn_mask, scale, recipe, capacity, state, starts)

    for part, x in (("key", k), ("value", v)):
        spec, win = getattr(recipe, part), state[f"window.{part}"]
        names = [f for f in ("data",) + FIELDS if f"{part}.{f}" in state]
        if length == 1:  # decode: the token joins the window; a full window becomes its chunk
            win.index_copy_(2, cache_position % c, x.to(kept))
            slot = cache_position // c
            if closes is None and _tracing(cache_position):
                current = tuple(state[f"{part}.{f}"].index_select(2, slot)[:, :, 0] for f in names)

                def close(w, *_):
                    fields = compress_chunk(w, spec, recipe, closing_skip(slot, c, start, recipe.sinks))
                    # copy: a bits=16 part's "data" is `w` itself, and cond branches must not alias inputs
                    return tuple(fields[f].to(t.dtype, copy=True) for f, t in zip(names, current))

                def wait(w, *cur):
                    return tuple(t.clone() for t in cur)

                new = torch.cond((cache_position[0] % c) == c - 1, close, wait, (win, *current))
                write_slots(state, part, {f: t[:, :, None] for f, t in zip(names, new)}, slot)
            elif closes or (closes is None and closes_chunk(cache_position, recipe, capacity)):
                close_window(state, part, recipe, slot, closing_skip(slot, c, start, recipe.sinks))
        else:  # prefill: chunks from the window's onwards are built from full-precision tokens
            chunks = base[part].view(b, h, n, c, d).to(kept)
            # only the chunks this call reaches: the window's, then those its tokens fill (a 512-
            # token prompt at capacity 4608: 4.9 -> 3.3 s compiled, SmolLM2). The later ones are
            # masked whatever they hold. The count is the length's alone: with min(n, .) export
            # cannot prove the compression's shape guards; past the last chunk, indices repeat it.
            touched = (first + torch.arange(length // c + 2, device=q.device)).clamp_max(n - 1)
            pos = (touched[:, None] * c + torch.arange(c, device=q.device))[None]
            skip = held_elsewhere(pos, start, recipe.sinks)[:, None, :, :, None]  # [B, 1, M, C, 1]
            fresh = compress_chunk(chunks.index_select(2, touched), spec, recipe, skip)
            for f, t in fresh.items():
                state[f"{part}.{f}"].index_copy_(2, touched, t.to(state[f"{part}.{f}"].dtype))
            win.copy_(chunks.index_select(2, cache_position[-1:] // c)[:, :, 0])
    return out


def _attend_many(q, k, v, cache_position, start, attn_mask, scale, recipe, capacity, state, starts):
    """Attention of L new tokens over the cache with every stored chunk rebuilt (prefill, where
    the new tokens dominate the work; none for a sequence's first tokens, `starts`), by SDPA: no
    [L, capacity] scores per head are held, so a long prompt costs the rebuilt keys and values,
    not L x capacity x heads floats. start [B]: each row's first real position. Returns (out
    [B, Hq, L, D], the rebuilt sequence of keys and values [B, H, N*C, D] in q's dtype by part,
    the new tokens in it)."""
    length = k.shape[2]
    n, c = slots(recipe, capacity)
    # the model's dtype, not fp32: these [B, H, N*C, D] tensors are the prefill's scratch memory,
    # and the kept dtype the caller re-compresses them in is never wider (`kept_dtype`)
    dtype = q.dtype
    if starts:  # nothing is stored before a sequence's first tokens: positions past them are
        # masked, so zeros do, and decompressing the whole store is skipped
        base = {part: F.pad(x.to(dtype), (0, 0, 0, n * c - length)) for part, x in (("key", k), ("value", v))}
    else:
        base = _rebuilt(k, v, cache_position, start, recipe, n, c, state, dtype)
    # positions past capacity are chunk padding, masked anyway: slicing them off the keys spares
    # padding the mask. Additive in q's dtype: SDPA turns a bool mask into one of these itself,
    # and finfo.min keeps a fully masked row (left padding) finite.
    # A sequence's first tokens see only themselves: their mask is built [L, L], not [L, capacity].
    keys = length if starts else capacity
    if starts and attn_mask is None:
        bias = None  # causal
    else:
        bias = _bias(None if attn_mask is None else attn_mask[..., :keys], cache_position, keys, dtype)
    return _sdpa_gqa(q, base["key"][:, :, :keys], base["value"][:, :, :keys], bias, scale), base


def _rebuilt(k, v, cache_position, start, recipe, n, c, state, dtype) -> dict[str, torch.Tensor]:
    """The cached sequence of keys and values [B, H, N*C, D] in dtype, by part, with the call's
    tokens k, v [B, H, L, D] at cache_position: every chunk decompressed, the window's chunk read
    from the window, a row's sinks (from start [B]) from the sink buffer."""
    b, h, _, d = k.shape
    first = cache_position[:1] // c
    chunk_ids = torch.arange(n, device=k.device)
    if recipe.sinks:
        pos = torch.arange(n * c, device=k.device)[None]
        sunk = is_sink(pos, start, recipe.sinks)[:, None, :, None]  # [B, 1, N*C, 1]
        held = (pos - start[:, None]).clamp(0, recipe.sinks - 1)[:, None, :, None].expand(b, h, n * c, d)
    base = {}
    for part, x in (("key", k), ("value", v)):
        spec = getattr(recipe, part)
        if spec.quantized:
            rebuilt = gear.decompress(_chunk(state, part), spec, dtype)  # [B, H, N, C, D]
        else:
            rebuilt = state[f"{part}.data"].to(dtype)
        window = state[f"window.{part}"][:, :, None].to(dtype)
        rebuilt = torch.where((chunk_ids == first)[:, None, None], window, rebuilt).reshape(b, h, n * c, d)
        if recipe.sinks:
            rebuilt = torch.where(sunk, state[f"sink.{part}"].to(dtype).gather(2, held), rebuilt)
        base[part] = rebuilt.index_copy(2, cache_position, x.to(dtype))
    return base


def _attend_one(q, k, v, cache_position, start, attn_mask, scale, recipe, capacity, state):
    """Attention of one new token (decode), reading compressed chunks as codes (`ops.codes`: no
    K/V is rebuilt), the window and sinks in full precision; start [B]: each row's first real
    position. The store itself is unchanged here. Returns [B, Hq, 1, D]."""
    b, h, _, d = k.shape
    n, c = slots(recipe, capacity)
    g = q.shape[1] // h
    tokens = n * c
    q4 = q.float().view(b, h, g, d)
    first = cache_position[:1] // c * c  # position of the window's first token
    neg = torch.finfo(torch.float32).min
    bias = _bias(attn_mask, cache_position, tokens, torch.float32)[:, :, :1]  # [B|1, 1, 1, N*C]
    pos = torch.arange(tokens, device=q.device)
    stored = (pos < first) & ~is_sink(pos[None], start, recipe.sinks)  # read from chunks
    stored = stored[:, None, None]  # [B, 1, 1, N*C]
    in_window = first + torch.arange(c, device=q.device)
    windowed = (in_window <= cache_position)[None, None, None]
    parts = {}
    for part, x in (("key", k), ("value", v)):
        window = state[f"window.{part}"].float().index_copy(2, cache_position - first, x.float())
        parts[part] = (window, *_codes_store(state, part, getattr(recipe, part), n, c))
    kwin, kcodes, kfix = parts["key"]
    logits = [(_store_scores(q4, kcodes, recipe.key, kfix) * scale + bias).masked_fill(~stored, neg),
              (q4 @ kwin.mT * scale + bias.gather(-1, in_window.expand(*bias.shape[:3], c))).masked_fill(~windowed, neg)]
    if recipe.sinks:  # sinks before the window (the window holds the others)
        at = sink_positions(start, recipe.sinks)  # [B, sinks]
        at_bias = at.clamp_max(tokens - 1)[:, None, None].expand(b, bias.shape[1], 1, recipe.sinks)
        sink_bias = bias.expand(b, -1, -1, -1).gather(-1, at_bias)
        sunk = (at < first)[:, None, None]
        logits.append((q4 @ state["sink.key"].float().mT * scale + sink_bias).masked_fill(~sunk, neg))
    probs = torch.cat(logits, dim=-1).softmax(dim=-1).split([tokens, c] + ([recipe.sinks] if recipe.sinks else []), -1)
    vwin, vcodes, vfix = parts["value"]
    out = _store_values(probs[0], vcodes, recipe.value, vfix) + probs[1] @ vwin
    if recipe.sinks:
        out = out + probs[2] @ state["sink.value"].float()
    return out.to(q.dtype).view(b, h * g, 1, d)


def _codes_store(state, part, spec, n, c):
    """(the store of `part` flattened over chunks: (codes, scale, minimum) or the raw data
    [B, H, N*C, ...], its corrections or None)."""
    if not spec.quantized:
        data = state[f"{part}.data"]
        return data.flatten(2, 3), None
    chunk = _chunk(state, part)
    flat = tuple(t.flatten(2, 3) for t in (chunk.codes, chunk.scale, chunk.minimum))
    return flat, _corrections(chunk, spec)


def _store_scores(q4, store, spec, fix):
    """q4 [B, H, g, D] against every stored token: [B, H, g, N*C]."""
    if not spec.quantized:
        return q4 @ store.float().mT
    out = codes.scores(q4, *store, spec)
    return out if fix is None else out + fix.scores(q4[:, :, :, None])[:, :, :, 0]


def _store_values(p, store, spec, fix):
    """p [B, H, g, N*C] over the stored values: [B, H, g, D]."""
    if not spec.quantized:
        return p @ store.float()
    out = codes.values(p, *store, spec)
    return out if fix is None else out + fix.output(p[:, :, :, None])[:, :, :, 0]


def real_tokens(attn_mask: torch.Tensor | None, cache_position: torch.Tensor) -> torch.Tensor:
    """Bool [B|1, L]: which of the call's L new tokens are real, not padding. A padding key is
    masked for every query, so a token is real when it may attend to itself; that holds under a
    sliding window too, where a late query no longer sees a row's first tokens. Read from each
    token's own entry of the mask: building the whole additive mask first cost 47 ms per layer
    of a 4000-token prefill."""
    if attn_mask is None:  # causal: every token sees itself
        return torch.ones_like(cache_position, dtype=torch.bool)[None]
    mask = attn_mask[:, 0]  # [B|1, L, capacity]
    own = mask.gather(-1, cache_position[None, :, None].expand(mask.shape[0], -1, 1))[..., 0]
    # in the mask's own dtype: an fp16 mask's "masked" is -65504, far above fp32's minimum
    return own if own.dtype == torch.bool else own > torch.finfo(own.dtype).min / 2


def row_starts(real: torch.Tensor, cache_position: torch.Tensor, state) -> torch.Tensor:
    """[B] int64: each row's first real position (its left padding's length), from real [B|1, L]
    (`real_tokens` of the call's tokens). Found by the call that starts a sequence (at position 0)
    and kept in row.start for the calls after it, whose masks need not show the padding any more
    (sliding windows)."""
    buf = state["row.start"]
    found = cache_position[real.int().argmax(dim=-1)]
    buf.copy_(torch.where(cache_position[0] == 0, found.expand(buf.shape), buf))
    return buf


def store_h2o_token(k, v, cache_position, attn_mask, recipe, capacity, state) -> torch.Tensor:
    """Compress one decode token k, v [B, H, 1, D] into the slot H2O picks for it (evicting its
    token), reset that slot's score, and add the token to the full-precision window if the cache
    has one. Returns the slot [B, H]."""
    b, h = k.shape[:2]
    _, recent, sinks = recipe.h2o.budget(capacity)
    positions, scores = state["h2o.positions"], state["h2o.scores"]
    start = row_starts(real_tokens(attn_mask, cache_position), cache_position, state)
    slot = h2o.choose_slot(scores, positions, cache_position, recent, sinks, start)  # [B, H]
    kept = kept_dtype(recipe, k.dtype)
    for part, x, spec in (("key", k, recipe.key), ("value", v, recipe.value)):
        for f, t in compress_chunk(x.to(kept), spec, recipe).items():  # t [B, H, 1, ...]
            dst = state[f"{part}.{f}"]
            idx = slot.view(b, h, *[1] * (dst.dim() - 2)).expand(b, h, 1, *dst.shape[3:])
            dst.scatter_(2, idx, t[:, :, None].to(dst.dtype) if t.dim() == dst.dim() - 1 else t.to(dst.dtype))
    positions.scatter_(2, slot[..., None], cache_position.to(positions.dtype).expand(b, h)[..., None])
    scores.scatter_(2, slot[..., None], 0.0)
    if "window.key" in state:
        write_h2o_window(state, k, v, cache_position, kept)
    return slot


def write_h2o_window(state, k, v, cache_position, kept) -> None:
    """Keep the newest W tokens of an H2O cache in full precision too: window.key / window.value
    [B, H, W, D] hold position p at index p % W, for the W positions up to the call's last.

    k, v [B, H, L, D] of the call's L new tokens at cache_position [L]; indices whose position
    is older than the call keep what they hold. Branch-free, so L can be a dynamic export dimension."""
    w = state["window.key"].shape[2]
    held = window_positions(cache_position, w)
    new = (held >= cache_position[0])[None, None, :, None]
    src = (held - cache_position[0]).clamp_min(0)[None, None, :, None]
    for part, x in (("key", k), ("value", v)):
        buf = state[f"window.{part}"]
        buf.copy_(torch.where(new, x.gather(2, src.expand(*x.shape[:2], w, x.shape[-1])).to(kept), buf))


def window_positions(cache_position: torch.Tensor, w: int) -> torch.Tensor:
    """[W] int64: the position each index of an H2O window holds once the call's last position
    (cache_position [L]) is written: position p sits at index p % W."""
    last = cache_position[-1]
    return last - (last - torch.arange(w, device=cache_position.device)) % w


def write_sinks(state, k, v, cache_position, start, count: int, kept) -> None:
    """Copy the new tokens that are sinks (each row's first `count` real tokens, from start [B])
    into sink.key / sink.value [B, H, count, D].

    Without data-dependent control flow: each sink slot takes the new token at its position if
    there is one, else keeps what it holds (a gather and a select: exact)."""
    hit = cache_position[None, None, :] == sink_positions(start, count)[:, :, None]  # [B, S, L]
    src = hit.int().argmax(dim=-1)  # [B, S]: index of the new token at that position (0 if none)
    here = hit.any(dim=-1)[:, None, :, None]  # [B, 1, S, 1]
    for part, x in (("key", k), ("value", v)):
        buf = state[f"sink.{part}"]
        new = x.gather(2, src[:, None, :, None].expand(*x.shape[:2], count, x.shape[-1]))
        buf.copy_(torch.where(here, new.to(kept), buf))


def closing_skip(slot: torch.Tensor, window: int, start: torch.Tensor, count: int) -> torch.Tensor:
    """[B, 1, window, 1]: the tokens of the chunk closing into `slot` [1] that its compression
    leaves out (`held_elsewhere`: padding, and sinks among its first `count` tokens)."""
    pos = slot * window + torch.arange(window, device=slot.device)
    return held_elsewhere(pos[None], start, count)[:, None, :, None]


def _attend_h2o(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state):
    if q.shape[2] == 1:
        return _attend_h2o_one(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state)
    return _prefill_h2o(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state)


def _prefill_h2o(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state):
    """Exact causal attention over the prompt, then the prompt's tokens H2O keeps (ranked by the
    attention they received, `h2o.prefill_scores`) compressed into the slots. Returns [B, Hq, L, D]."""
    b, h, length, d = k.shape
    hq = q.shape[1]
    heavy, recent, sinks = recipe.h2o.budget(capacity)
    bias = _bias(attn_mask, cache_position, capacity, q.dtype)[..., :length]
    bias = bias[:, :1].expand(b, 1, length, length)[:, :, None]  # [B, 1, 1, L, L]
    logits = (q.view(b, h, hq // h, length, d).float() @ k[:, :, None].float().mT) * scale + bias.float()
    probs = logits.softmax(dim=-1)
    out = (probs @ v[:, :, None].float()).to(q.dtype).reshape(b, hq, length, d)
    real = real_tokens(attn_mask, cache_position)
    start = row_starts(real, cache_position, state)
    token_scores = h2o.prefill_scores(probs.reshape(b, hq, length, length), h, recipe.h2o.observe,
                                      recipe.h2o.decay, real.expand(b, length))
    keep = h2o.keep_after_prefill(token_scores, heavy, recent, sinks, start)  # [B, H, S]
    src = keep.clamp_min(0)
    kept = kept_dtype(recipe, q.dtype)
    for part, x, spec in (("key", k, recipe.key), ("value", v, recipe.value)):
        tokens = x.gather(2, src[..., None].expand(b, h, src.shape[-1], d))
        for f, t in compress_chunk(tokens[:, :, :, None].to(kept), spec, recipe).items():
            state[f"{part}.{f}"].copy_(t.to(state[f"{part}.{f}"].dtype))
    state["h2o.positions"].copy_(keep.to(torch.int32))
    if "window.key" in state:
        write_h2o_window(state, k, v, cache_position, kept)
    state["h2o.scores"].copy_(token_scores.gather(-1, src).masked_fill(keep == h2o.EMPTY, 0.0))
    return out


def _attend_h2o_one(q, k, v, cache_position, attn_mask, scale, recipe, capacity, state):
    """One decode token: store it in the slot H2O picks, attend over every slot and add the
    attention to the slot scores. Slots are read as codes (`ops.codes`, as `_attend_one` reads
    chunks: no K/V is rebuilt), but for the new token, attended exactly, and the tokens of the
    full-precision window, read from there. Returns [B, Hq, 1, D]."""
    b, h, _, d = k.shape
    g = q.shape[1] // h
    slot = store_h2o_token(k, v, cache_position, attn_mask, recipe, capacity, state)  # [B, H]
    positions = state["h2o.positions"]
    n = positions.shape[-1]
    q4 = q.float().view(b, h, g, d)
    new = torch.zeros_like(positions, dtype=torch.bool).scatter(2, slot[..., None], True)[:, :, None]
    kstore, kfix = _codes_store(state, "key", recipe.key, n, 1)
    logits = _store_scores(q4, kstore, recipe.key, kfix)  # [B, H, g, S]
    windowed = "window.key" in state
    if windowed:  # slot -> window index of its token (position p sits at p % W)
        w = state["window.key"].shape[2]
        held = ((positions.long() > cache_position - w) & (positions != h2o.EMPTY))[:, :, None] & ~new
        at = divmod_int(positions.long().clamp_min(0), w)[1][:, :, None].expand(b, h, g, n)
        logits = torch.where(held, (q4 @ state["window.key"].float().mT).gather(-1, at), logits)
    logits = torch.where(new, (q4 * k.float()).sum(-1, keepdim=True), logits)
    model = _bias(attn_mask, cache_position, capacity, q.dtype)[:, :1, 0]  # [B|1, 1, capacity]
    at_slot = model.expand(b, h, capacity).gather(-1, positions.long().clamp_min(0))
    bias = at_slot.masked_fill(positions == h2o.EMPTY, torch.finfo(q.dtype).min).float()  # [B, H, S]
    probs = (logits * scale + bias[:, :, None]).softmax(dim=-1)  # [B, H, g, S]
    coded = probs.masked_fill(new | held, 0.0) if windowed else probs.masked_fill(new, 0.0)
    vstore, vfix = _codes_store(state, "value", recipe.value, n, 1)
    out = _store_values(coded, vstore, recipe.value, vfix)
    if windowed:
        mass = probs.new_zeros(b, h, g, w).scatter_add(-1, at, probs * held)
        out = out + mass @ state["window.value"].float()
    out = out + probs.gather(-1, slot[:, :, None, None].expand(b, h, g, 1)) * v.float()
    state["h2o.scores"].copy_(h2o.accumulate(state["h2o.scores"], probs.reshape(b, h * g, 1, n),
                                             recipe.h2o.decay))
    return out.to(q.dtype).view(b, h * g, 1, d)

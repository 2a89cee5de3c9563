"""Find every attention that reads a KV cache buffer, in the program torch.export returns.

A KV cache is a rank-4 buffer [B, H_kv, T, D] written in place on dim 2 at the new tokens'
positions: `index_copy_(buf, 2, pos, x)` (transformers' static cache) or `index_put_(buf,
[None, None, pos], x)` (gpt-fast's `buf[:, :, pos] = x`). A site is a key write and a value write
that feed one attention, through any repeat_kv view chain:
- `scaled_dot_product_attention(q, K, V, mask, scale=…, enable_gqa=…)`;
- eager attention: `matmul(q, K^T) → mul/div by a constant → add(mask) → softmax → matmul(·, V)`.
A cache buffer read any other way raises UnsupportedGraphError naming the node, so a model is
never silently left with an uncompressed cache.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx
from torch.export import ExportedProgram

aten = torch.ops.aten

WRITES = (aten.index_copy_.default, aten.index_put_.default)
# what repeat_kv and friends turn a cache read into, in both export IRs
VIEWS = (aten.unsqueeze.default, aten.expand.default, aten.clone.default, aten.reshape.default,
         aten._unsafe_view.default, aten.view.default, aten.repeat_interleave.self_int,
         aten.slice.Tensor, aten.alias.default, aten.contiguous.default)
TRANSPOSES = (aten.transpose.int, aten.permute.default)
# between softmax and the value matmul: casts, copies, and inference-mode dropout
PROB_PASSTHROUGH = (aten.clone.default, aten._to_copy.default, aten.to.dtype, aten.dropout.default,
                    aten.contiguous.default)
ASSERTS = (aten._assert_tensor_metadata.default,)


class UnsupportedGraphError(RuntimeError):
    """The program reads or writes a KV cache in a way the gearfx passes do not handle."""


@dataclasses.dataclass(frozen=True)
class KVSite:
    """One attention over a cached key/value pair.

    attention: the node whose output is the attention result [B, Hq, L, D] (SDPA, or the
        value matmul of eager attention); query/mask: its q and mask inputs (mask may be None);
    scale: the softmax scale; key_write/value_write: the in-place cache writes, whose args give
        the cache buffers, the new keys/values and positions.
    """

    attention: fx.Node
    query: fx.Node
    mask: fx.Node | None
    scale: float
    key_write: fx.Node
    value_write: fx.Node

    @property
    def position(self) -> fx.Node:
        return _write_parts(self.key_write)[1]

    @property
    def value_position(self) -> fx.Node:
        return _write_parts(self.value_write)[1]

    @property
    def new_key(self) -> fx.Node:
        return _write_parts(self.key_write)[2]

    @property
    def new_value(self) -> fx.Node:
        return _write_parts(self.value_write)[2]


def _write_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(buffer, positions, new values) of a cache write node."""
    if node.target == aten.index_copy_.default:
        buf, dim, pos, x = node.args
        return buf, pos, x
    buf, indices, x = node.args[:3]
    return buf, indices[2], x


def _is_cache_write(node: fx.Node, buffers: dict[str, str]) -> bool:
    if node.op != "call_function" or node.target not in WRITES:
        return False
    buf = node.args[0]
    if buf.op != "placeholder" or buf.name not in buffers:
        return False
    val = buf.meta.get("val")
    if val is None or val.dim() != 4:
        return False
    if node.target == aten.index_copy_.default:
        return node.args[1] in (2, -2)
    indices = node.args[1]
    return len(indices) == 3 and indices[0] is None and indices[1] is None and indices[2] is not None


def _source_write(node: fx.Node, writes: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The cache write whose result reaches `node` through view ops only, else None.

    An in-place write returns its buffer, and later reads use either that result or the buffer
    placeholder itself; both lead back to the write.
    """
    while node.op == "call_function" and node.target in VIEWS:
        node = node.args[0]
    if node in writes.values():
        return node
    return writes.get(node)


def _scale_chain(node: fx.Node) -> tuple[fx.Node, float, fx.Node | None] | None:
    """Walk back from a softmax input: (scores matmul, scale, mask) or None."""
    mask, scale = None, 1.0
    if node.op == "call_function" and node.target == aten.add.Tensor:
        node, mask = node.args
    while node.op == "call_function" and node.target in (aten.mul.Tensor, aten.div.Tensor) \
            and isinstance(node.args[1], (int, float)):
        scale = scale * node.args[1] if node.target == aten.mul.Tensor else scale / node.args[1]
        node = node.args[0]
    if node.op == "call_function" and node.target == aten.matmul.default:
        return node, scale, mask
    return None


def _eager_site(mm: fx.Node, writes) -> tuple | None:
    """Match matmul(softmax(scale * q @ K^T + mask), V) ending at `mm`."""
    probs, v_read = mm.args
    while probs.op == "call_function" and probs.target in PROB_PASSTHROUGH:
        probs = probs.args[0]
    if not (probs.op == "call_function" and probs.target in (aten.softmax.int, aten._softmax.default)
            and probs.args[1] in (-1, 3)):
        return None
    chain = _scale_chain(probs.args[0])
    if chain is None:
        return None
    scores, scale, mask = chain
    q, kt = scores.args
    if not (kt.op == "call_function" and kt.target in TRANSPOSES):
        return None
    kw, vw = _source_write(kt.args[0], writes), _source_write(v_read, writes)
    if kw is None or vw is None:
        return None
    return q, mask, scale, kw, vw


def find_kv_sites(ep: ExportedProgram) -> list[KVSite]:
    """Every KV-cache attention of `ep`, in graph order (one per decoder layer).

    Raises UnsupportedGraphError if a cache buffer is read by anything but a recognised attention,
    or if the program has no KV cache at all.
    """
    buffers = ep.graph_signature.inputs_to_buffers
    graph = ep.graph_module.graph
    writes = {n.args[0]: n for n in graph.nodes if _is_cache_write(n, buffers)}
    if not writes:
        functional = [n for n in graph.nodes if n.op == "call_function" and n.target in
                      (aten.index_copy.default, aten.index_put.default)]
        hint = (" (the program looks functionalized; pass the ExportedProgram that "
                "torch.export.export returns, before run_decompositions)" if functional else "")
        raise UnsupportedGraphError(
            "no KV cache found: no rank-4 buffer is written in place on dim 2 " + hint)
    sites = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == aten.scaled_dot_product_attention.default:
            kw, vw = _source_write(node.args[1], writes), _source_write(node.args[2], writes)
            if kw is None or vw is None:
                continue
            q = node.args[0]
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
            if causal:
                raise UnsupportedGraphError(
                    f"node {node.name!r}: SDPA with is_causal=True over a KV cache; the causal "
                    "mask must be explicit for cached attention")
            scale = node.args[6] if len(node.args) > 6 else node.kwargs.get("scale")
            if scale is None:
                scale = q.meta["val"].shape[-1] ** -0.5
            match = (q, mask, float(scale), kw, vw)
        elif node.target == aten.matmul.default:
            match = _eager_site(node, writes)
            if match is None:
                continue
        else:
            continue
        q, mask, scale, kw, vw = match
        sites.append(KVSite(node, q, mask, scale, kw, vw))
    _check_all_reads_covered(graph, writes, sites)
    return sites


def _check_all_reads_covered(graph: fx.Graph, writes: dict[fx.Node, fx.Node], sites: list[KVSite]) -> None:
    """Every read of a cache buffer must reach a found attention through views only."""
    ends = {s.attention for s in sites}
    for s in sites:
        if s.attention.target == aten.matmul.default:  # eager: the scores matmul reads the keys
            ends |= {u for u in s.query.users if u.target == aten.matmul.default}

    def reaches_attention(node: fx.Node) -> bool:
        if node in ends or node.target in ASSERTS:
            return True
        if node.op == "call_function" and node.target in VIEWS + TRANSPOSES:
            return bool(node.users) and all(reaches_attention(u) for u in node.users)
        return False

    found = {s.key_write for s in sites} | {s.value_write for s in sites}
    for buf, write in writes.items():
        if write not in found:
            raise UnsupportedGraphError(
                f"node {write.name!r} writes the KV cache {buf.name!r}, but no supported "
                "attention reads it")
        for user in list(buf.users) + list(write.users):
            if user is not write and not reaches_attention(user):
                raise UnsupportedGraphError(
                    f"node {user.name!r} ({user.target}) reads the KV cache {buf.name!r} in a "
                    "way gearfx does not support; supported: scaled_dot_product_attention or "
                    "matmul-softmax-matmul attention over the cache, through repeat_kv views")


__all__ = ["KVSite", "UnsupportedGraphError", "find_kv_sites"]

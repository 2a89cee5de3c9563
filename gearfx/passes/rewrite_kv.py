"""Rewrite every KV-cache attention of an ExportedProgram to read and write a compressed cache.

For each site found by `find_kv_sites` (layer i, in graph order), with the recipe for layer i:
- the fp cache buffers key_cache_i / value_cache_i are removed from the program;
- the recipe's state tensors (`gearfx.compress.layout.cache_layout`) are added as non-persistent
  buffers `gearfx_{i}_{name}`, shaped from the removed buffers (batch, KV heads, capacity, D);
- the two in-place cache writes and the attention become one `gearfx::attend` call that stores
  the new keys/values and returns the attention output; the repeat_kv views, the eager
  scores/softmax chain and the old buffers become dead and are removed.
The result is a new, valid ExportedProgram (its graph is linted); the input is not modified.
"""

from __future__ import annotations

import copy

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (ExportGraphSignature, InputKind, InputSpec, TensorArgument)

from gearfx.compress.layout import allocate
from gearfx.ops import SiteConfig  # also registers torch.ops.gearfx
from gearfx.passes.find_kv_sites import ASSERTS, PROB_PASSTHROUGH, UnsupportedGraphError, find_kv_sites
from gearfx.passes.program import with_graph
from gearfx.recipes import Recipe


STATE_PREFIX = "gearfx_"


def state_target(layer: int, name: str) -> str:
    """Buffer name of state tensor `name` (a layout name like "key.codes") of layer `layer`."""
    return f"{STATE_PREFIX}{layer}_{name.replace('.', '_')}"


def rewrite_kv(ep: ExportedProgram, recipe: Recipe) -> ExportedProgram:
    sites = find_kv_sites(ep)
    gm = copy.deepcopy(ep.graph_module)
    graph = gm.graph
    node = {n.name: n for n in graph.nodes}
    sig = ep.graph_signature
    fake_mode = next(n.meta["val"].fake_mode for n in graph.nodes
                     if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor))
    first_user_input = next(n for n in graph.nodes if n.op == "placeholder" and n.name in sig.user_inputs)

    shape = sites[0].key_write.args[0].meta["val"].shape
    recipe.check_model(head_dim=shape[-1], num_layers=len(sites))
    constants = dict(ep.constants)
    new_specs, removed, writes = [], set(), []
    for layer, site in enumerate(sites):
        if site.position is not site.value_position:
            raise UnsupportedGraphError(
                f"node {site.attention.name!r}: keys and values are written at different positions")
        cache = site.key_write.args[0].meta["val"]
        b, h, capacity, d = cache.shape
        config = SiteConfig(recipe.for_layer(layer), capacity)
        state = allocate(config.layout(b, h, d, cache.dtype), device=cache.device)
        placeholders = []
        for name, tensor in state.items():
            target = state_target(layer, name)
            constants[target] = tensor
            with graph.inserting_before(first_user_input):
                ph = graph.placeholder(f"b_{target}")
            ph.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True)
            placeholders.append(ph)
            new_specs.append(InputSpec(InputKind.BUFFER, TensorArgument(ph.name), target=target, persistent=False))
        attention = node[site.attention.name]
        args = (node[site.query.name], node[site.new_key.name], node[site.new_value.name],
                node[site.position.name], node[site.mask.name] if site.mask is not None else None,
                site.scale, config.to_json(), placeholders)
        with graph.inserting_before(attention):
            op = graph.call_function(torch.ops.gearfx.attend.default, args)
        op.meta["val"] = attention.meta["val"]
        attention.replace_all_uses_with(op)
        graph.erase_node(attention)
        writes += [node[site.key_write.name], node[site.value_write.name]]
        removed |= {site.key_write.args[0].name, site.value_write.args[0].name}

    _remove_dead(graph)  # the read chains first: in-place writes are never dead to fx
    for write in writes:
        graph.erase_node(write)
    _remove_dead(graph)
    for name in removed:
        if node[name].users:
            raise UnsupportedGraphError(
                f"the KV cache {name!r} is still read after the rewrite by "
                f"{', '.join(u.name for u in node[name].users)}")
        graph.erase_node(node[name])
    graph.lint()
    gm.recompile()

    targets = {sig.inputs_to_buffers[name] for name in removed}
    specs = []
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT and new_specs:
            specs, new_specs = specs + new_specs, []
        if spec.arg.name not in removed:
            specs.append(spec)
    for t in targets:
        constants.pop(t, None)
    return with_graph(ep, gm, ExportGraphSignature(specs, list(sig.output_specs)), constants,
                      {k: v for k, v in ep.state_dict.items() if k not in targets})


def _remove_dead(graph: torch.fx.Graph) -> None:
    """Dead-code elimination that also drops metadata asserts on otherwise dead values and unused
    dropouts (fx keeps both: asserts have no users by design, dropout draws random numbers)."""
    changed = True
    while changed:
        changed = False
        for n in reversed(graph.nodes):
            if n.op != "call_function":
                continue
            dead_assert = n.target in ASSERTS and all(u.target in ASSERTS for u in n.args[0].users)
            if dead_assert or (n.target in PROB_PASSTHROUGH and not n.users):
                graph.erase_node(n)
                changed = True
        changed |= graph.eliminate_dead_code()

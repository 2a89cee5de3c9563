"""Point every gearfx::attend call at gearfx::attend_kernel (same schema, opaque to the graph)."""

from __future__ import annotations

import copy

import torch
from torch.export import ExportedProgram

import gearfx.ops  # noqa: F401  (registers torch.ops.gearfx)
from gearfx.passes.program import with_graph


def use_kernels(ep: ExportedProgram) -> ExportedProgram:
    gm = copy.deepcopy(ep.graph_module)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.gearfx.attend.default:
            node.target = torch.ops.gearfx.attend_kernel.default
    gm.graph.lint()
    gm.recompile()
    return with_graph(ep, gm)

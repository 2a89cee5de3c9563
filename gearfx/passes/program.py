"""Building a new ExportedProgram around a rewritten graph."""

from __future__ import annotations

import copy

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature


def with_graph(ep: ExportedProgram, gm: torch.fx.GraphModule, signature: ExportGraphSignature | None = None,
               constants: dict | None = None, state_dict: dict | None = None) -> ExportedProgram:
    """`ep` with graph module `gm` (and optionally a new signature, constants, state dict).
    The constructor verifies the result, so a pass cannot return an invalid program."""
    return ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=signature or ep.graph_signature,
        state_dict=ep.state_dict if state_dict is None else state_dict,
        range_constraints=ep.range_constraints, module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=ep.constants if constants is None else constants,
        verifiers=ep.verifiers)

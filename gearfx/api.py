"""The public entry points: compile a decoder with a recipe, or export the rewritten program.

Each entry point exports the model's decoder step first (the slow part, tens of seconds for a
real model). To try several recipes on one model and cache shape, `capture` it once and pass the
captured decoder instead of the model: each recipe then only rewrites the captured program.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.export import ExportedProgram

from gearfx.capture import Decoder, export_decoder
from gearfx.passes import find_kv_sites, rewrite_kv
from gearfx.recipes import Recipe, load_recipe
from gearfx.runtime import CompiledModel


def capture(model: nn.Module, *, max_cache_len: int | None = None, batch_size: int | None = None,
            last_logits_only: bool = False) -> Decoder:
    """Export `model`'s decoder step (see `compile` for what model may be) with a cache of
    max_cache_len tokens for batch_size rows, for `compile` / `export` with any number of recipes.
    The captured program shares the model's weights. last_logits_only (transformers models): a
    step returns the logits of its last position only, [B, 1, V], as `generate` computes them,
    so a long prompt's prefill holds no [B, L, V] logits."""
    return export_decoder(model, batch_size, max_cache_len, last_logits_only)


def _decoder(model: nn.Module | Decoder, batch_size, max_cache_len) -> Decoder:
    if not isinstance(model, Decoder):
        return export_decoder(model, batch_size, max_cache_len)
    for name, given, captured in (("batch_size", batch_size, model.batch_size),
                                  ("max_cache_len", max_cache_len, model.max_cache_len)):
        if given is not None and given != captured:
            raise ValueError(f"{name}={given}, but the decoder was captured with {name}={captured}; "
                             f"capture the model again for another {name}")
    return model


def _rewrite(model: nn.Module | Decoder, recipe, batch_size,
             max_cache_len) -> tuple[Decoder, ExportedProgram, Recipe, tuple]:
    recipe = load_recipe(recipe)
    decoder = _decoder(model, batch_size, max_cache_len)
    sites = find_kv_sites(decoder.program)
    b, h, t, d = sites[0].key_write.args[0].meta["val"].shape
    program = rewrite_kv(decoder.program, recipe)
    return decoder, program, recipe, (len(sites), b, h, t, d)


def compile(model: nn.Module | Decoder, recipe: str | Path | Recipe, *, max_cache_len: int | None = None,
            batch_size: int | None = None, backend_compile: bool = True) -> CompiledModel:
    """Rewrite `model`'s KV cache into `recipe`'s compressed cache and compile it with Inductor.

    model: a transformers causal LM (give max_cache_len and batch_size), or an nn.Module that keeps
    its KV cache in buffers [B, H_kv, T, D] and is called as module(input_ids, cache_position);
    or a decoder from `capture` (max_cache_len and batch_size are then the captured ones).
    recipe: a shipped recipe name, a YAML path, or a Recipe. backend_compile=False runs the
    rewritten program eagerly (no Inductor), which starts faster and computes the same thing.
    """
    decoder, program, recipe, shape = _rewrite(model, recipe, batch_size, max_cache_len)
    return CompiledModel(decoder, program, recipe, shape, compile=backend_compile)


def export(model: nn.Module | Decoder, recipe: str | Path | Recipe, *, max_cache_len: int | None = None,
           batch_size: int | None = None) -> ExportedProgram:
    """The rewritten torch.export program (compressed cache state as buffers, gearfx ops inside),
    for export pipelines. `gearfx::attend` inlines into aten ops on run_decompositions."""
    return _rewrite(model, recipe, batch_size, max_cache_len)[1]


def export_onnx(model: nn.Module | Decoder, recipe: str | Path | Recipe, path: str | Path, *,
                max_cache_len: int | None = None, batch_size: int | None = None) -> Path:
    """Export `model` with `recipe`'s compressed cache to ONNX files in the folder `path`
    (prefill.onnx, decode.onnx, gearfx.json; the state is explicit inputs/outputs). Run it with
    `gearfx.exporters.onnx.OnnxDecoder`. Needs the `onnx` extra."""
    from gearfx.exporters.onnx import export_onnx as _export_onnx

    return _export_onnx(model, recipe, path, max_cache_len=max_cache_len, batch_size=batch_size)


__all__ = ["capture", "compile", "export", "export_onnx"]

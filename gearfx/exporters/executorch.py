"""ExecuTorch export through optimum-executorch, with the compressed KV cache inside the .pte.

Importing this module registers two recipes with optimum-executorch's recipe registry:
- `gearfx_xnnpack`: the linear layers delegated to XNNPACK, everything else (the compressed-cache
  attention included) on ExecuTorch's portable kernels;
- `gearfx_portable`: portable kernels only.
Both take `gearfx_recipe` (a shipped recipe name or a YAML path; default gear-4bit) and work on
the program optimum-executorch exports for text generation (`CausalLMExportableModule.export()`):
its KV cache buffers are rewritten into the recipe's state buffers before lowering, so the .pte's
memory plan holds the compressed cache (mutable buffers, updated in place by each call).

    python -m gearfx.exporters.executorch --model DIR --gearfx-recipe gear-4bit --output-dir OUT

(or, in Python, `import gearfx.exporters.executorch` and then optimum's usual
`main_export(DIR, "text-generation", "gearfx_xnnpack", OUT, max_seq_len=N,
recipe_kwargs={"gearfx_recipe": "gear-4bit"})`). Needs the export environment (`make export-env`):
optimum-executorch 1.1.0 pins transformers 5.0.0rc1.

The program has one method, `forward(input_ids [1, L], cache_position [L])`, for prompts and
decode steps alike, so every call takes the attention op's multi-token path (it stores the
tokens and recompresses the open chunk; the results equal the decode path's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.export import ExportedProgram

from gearfx.exporters.stateful import _torchao_decompositions
from gearfx.passes import rewrite_kv
from gearfx.passes.rewrite_kv import STATE_PREFIX
from gearfx.recipes import Recipe, load_recipe

from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, ExecutorchProgramManager, to_edge_transform_and_lower
from executorch.exir.passes import MemoryPlanningPass
from executorch.exir.passes.constant_prop_pass import constant_prop_pass
from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
from optimum.exporters.executorch.integrations import CausalLMExportableModule
from optimum.exporters.executorch.recipe_registry import register_recipe


class UnsupportedExportError(ValueError):
    """A recipe / runtime / export option combination this export cannot produce."""


def _portable_decompositions() -> dict:
    """aten ops of the compressed cache that ExecuTorch's portable kernels lack (1.5: bit shifts
    and sort), as ops they have. The shifts act on uint8 codes, where x << s is x * 2**s (mod 256)
    and x >> s is floor(x / 2**s), s < 8; sort only orders the few outlier indices of a chunk."""
    aten = torch.ops.aten

    def lshift(x, s):
        return x * (1 << int(s))

    def rshift(x, s):
        return torch.div(x, 1 << int(s), rounding_mode="floor")

    def sort(x, dim=-1, descending=False):
        return torch.topk(x, x.shape[dim], dim, largest=descending, sorted=True)

    return {aten.__lshift__.Scalar: lshift, aten.__rshift__.Scalar: rshift, aten.sort.default: sort}


def check_supported(recipe: Recipe, model: CausalLMExportableModule) -> None:
    """Raise UnsupportedExportError naming what this export cannot do."""
    if recipe.h2o is not None:
        raise UnsupportedExportError(
            f"recipe {recipe.name!r} evicts tokens (h2o), which ExecuTorch export does not support: "
            "eviction needs separate prefill and decode steps, and optimum-executorch's program has "
            "one method for both; use a recipe without h2o, or ONNX (gearfx.export_onnx)")
    if model.use_custom_kv_cache or model.use_custom_sdpa:
        raise UnsupportedExportError(
            "use_custom_kv_cache / use_custom_sdpa are not supported with gearfx recipes: gearfx "
            "replaces the KV cache and its attention itself")


def prepare(ep: ExportedProgram, recipe: Recipe) -> ExportedProgram:
    """optimum-executorch's exported decoder -> the program to lower: the compressed cache
    rewritten in, gearfx and torchao ops decomposed into aten ops the portable kernels have, and
    input-independent values (the power iteration's start vectors) folded into constants. Folding
    also keeps their float64 arithmetic exact: lowered, its scalars would be rounded to float32."""
    ep = rewrite_kv(ep, recipe)
    with torch.no_grad():
        ep = ep.run_decompositions({**_torchao_decompositions(), **_portable_decompositions()})
    return constant_prop_pass(ep)


def _lower(model: CausalLMExportableModule, gearfx_recipe: str | Path | Recipe, partitioner: list) -> dict:
    recipe = load_recipe(gearfx_recipe)
    check_supported(recipe, model)
    programs = {"forward": prepare(ep, recipe) for ep in model.export().values()}
    manager = to_edge_transform_and_lower(
        programs, partitioner=partitioner, constant_methods=model.metadata,
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
    # The state buffers are planned (allocated once, mutated in place), not graph inputs. Their
    # initial values (an empty cache) are serialized: ExecuTorch otherwise leaves mutated buffers
    # uninitialized, and garbage in never-written slots could reach the output as NaN * 0.
    manager = manager.to_executorch(ExecutorchBackendConfig(
        extract_delegate_segments=True, memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
        passes=[InitializedMutableBufferPass([STATE_PREFIX])]))
    return {"model": manager}


@register_recipe("gearfx_xnnpack")
def export_gearfx_xnnpack(model, gearfx_recipe: str | Path | Recipe = "gear-4bit", **kwargs):
    """optimum-executorch recipe: linear layers on XNNPACK, the compressed-cache attention on
    portable kernels (XNNPACK 1.5 cannot define the uint8/fp16 state tensors of the cache ops)."""
    return _lower(model, gearfx_recipe, [XnnpackPartitioner(configs=[LinearConfig])])


@register_recipe("gearfx_portable")
def export_gearfx_portable(model, gearfx_recipe: str | Path | Recipe = "gear-4bit", **kwargs):
    """optimum-executorch recipe: portable kernels only."""
    return _lower(model, gearfx_recipe, [])


def planned_state_bytes(manager: ExecutorchProgramManager, method: str = "forward") -> int:
    """Bytes the .pte's memory plan allocates to the compressed cache's state buffers (each one
    rounded up to the planner's alignment)."""
    ep = manager.exported_program(method)
    names = {v: k for k, v in ep.graph_signature.inputs_to_buffers.items() if v.startswith(STATE_PREFIX)}
    total = 0
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in names.values():
            spec = node.meta["spec"]
            if spec.mem_id is None:
                raise RuntimeError(f"state buffer {node.name} has no planned memory")
            total += spec.allocated_memory
    return total


def main(argv: list[str] | None = None) -> None:
    """`python -m gearfx.exporters.executorch`: optimum-executorch's main_export with a gearfx recipe."""
    from optimum.exporters.executorch import main_export

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face model folder (or hub id)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--recipe", default="gearfx_xnnpack", choices=["gearfx_xnnpack", "gearfx_portable"])
    parser.add_argument("--gearfx-recipe", default="gear-4bit", help="a shipped gearfx recipe or a YAML path")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="KV cache capacity")
    args = parser.parse_args(argv)
    main_export(args.model, "text-generation", args.recipe, args.output_dir, max_seq_len=args.max_seq_len,
                recipe_kwargs={"gearfx_recipe": args.gearfx_recipe})
    print(Path(args.output_dir) / "model.pte")


if __name__ == "__main__":
    main()

"""gearfx: KV-cache compression for decoder LLMs as a torch.export graph rewrite."""

from gearfx.api import capture, compile, export, export_onnx
from gearfx.recipes import Recipe, RecipeError, list_recipes, load_recipe
from gearfx.runtime import CacheOverflowError, CompiledModel, MemoryReport

__all__ = ["CacheOverflowError", "CompiledModel", "MemoryReport", "Recipe", "RecipeError", "capture", "compile",
           "export", "export_onnx", "list_recipes", "load_recipe"]

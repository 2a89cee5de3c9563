"""gearfx: KV-cache compression for decoder LLMs as a torch.export graph rewrite."""

from gearfx.recipes import Recipe, RecipeError, list_recipes, load_recipe

__all__ = ["Recipe", "RecipeError", "list_recipes", "load_recipe"]

"""gearfx's torch.library ops: what the rewritten program calls at each attention site.

`gearfx::attend` stores a layer's new keys/values into its compressed state and returns the
attention output (see `reference.attend`). It is registered with a CompositeImplicitAutograd
kernel: on any retrace (torch.compile, run_decompositions, export lowering) it inlines into plain
aten ops, so Inductor fuses it and ExecuTorch/ONNX need no custom kernel. The recipe and capacity
travel as a JSON string argument, so the graph alone says what each site does.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache

import torch

from gearfx.compress.layout import Meta, cache_layout
from gearfx.ops import reference
from gearfx.recipes import Recipe, parse_recipe


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    """What one attention site's op needs besides tensors: its layer's recipe and the capacity."""

    recipe: Recipe
    capacity: int

    def to_json(self) -> str:
        body = dataclasses.asdict(dataclasses.replace(self.recipe, layers=()))
        del body["layers"]
        return json.dumps({"recipe": body, "capacity": self.capacity}, sort_keys=True)

    @staticmethod
    @lru_cache(maxsize=None)
    def from_json(text: str) -> SiteConfig:
        data = json.loads(text)
        return SiteConfig(parse_recipe(data["recipe"]), data["capacity"])

    def layout(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> dict[str, Meta]:
        return cache_layout(self.recipe, batch, heads, head_dim, self.capacity, dtype)


_lib = torch.library.Library("gearfx", "DEF")
_lib.define(
    "attend(Tensor q, Tensor k, Tensor v, Tensor cache_position, Tensor? attn_mask, float scale, "
    "str config, Tensor(a!)[] state) -> Tensor"
)


def _attend(q, k, v, cache_position, attn_mask, scale, config, state):
    cfg = SiteConfig.from_json(config)
    b, h, _, d = k.shape
    names = cfg.layout(b, h, d, k.dtype)
    return reference.attend(q, k, v, cache_position, attn_mask, scale, cfg.recipe, cfg.capacity,
                            dict(zip(names, state)))


_lib.impl("attend", _attend, "CompositeImplicitAutograd")

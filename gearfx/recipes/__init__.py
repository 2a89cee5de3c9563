"""Recipes: named, validated, immutable KV-cache compression configurations.

A recipe says how keys and values are stored (bits, quantization axis and group, GEAR low-rank and
sparse corrections), how long the full-precision window is (it is also the chunk that gets
compressed at once), and whether H2O eviction keeps the cache under a fixed token budget. Shipped
recipes are YAML files next to this module; users can load their own YAML files the same way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

BITS = (2, 3, 4, 5, 6, 7, 8, 16)
AXES = ("channel", "token")


class RecipeError(ValueError):
    """A recipe field has a value that is not allowed; the message names field, value and rule."""


@dataclass(frozen=True)
class TensorSpec:
    """How one of K or V is stored.

    bits: 2..8 quantize to that many bits, 16 keeps the tensor in full precision.
    axis: "channel" gives each channel its own scale, shared by `group` consecutive tokens (KIVI's
        key layout: keys have per-channel outliers); "token" gives each token its own scale per
        `group` consecutive channels (KIVI's value layout).
    group: tokens per scale on the channel axis, channels per scale on the token axis.
    rank: GEAR low-rank correction of the quantization error, per chunk and head: an integer rank,
        or a float in (0, 1) meaning that fraction of the chunk length.
    outliers: GEAR sparse correction: the fraction of each chunk's entries with the largest
        magnitude, taken out before quantizing and kept exactly.
    """

    bits: int = 16
    axis: str = "channel"
    group: int = 32
    rank: int | float = 0
    outliers: float = 0.0

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def resolve_rank(self, chunk: int) -> int:
        """The integer rank for a chunk of `chunk` tokens."""
        if isinstance(self.rank, float):
            return max(1, round(self.rank * chunk))
        return self.rank

    def num_outliers(self, chunk: int, head_dim: int) -> int:
        """Outliers kept per chunk and head: a fixed count, so every shape stays static."""
        return round(self.outliers * chunk * head_dim)


@dataclass(frozen=True)
class H2O:
    """Heavy-hitter eviction under a fixed budget of cached tokens.

    heavy / recent: tokens kept for their accumulated attention / for being the most recent; an
        integer count, or a float in [0, 1] meaning that fraction of the cache capacity.
    sinks: the first tokens of the sequence, always kept (attention sinks).
    observe: a prompt token is also kept when the prompt's last `observe` queries attend to it
        (SnapKV's observation window, pooled over neighbouring tokens); 0 scores prompt tokens by
        every prompt query only, as H2O does (`compress.h2o.prefill_scores`).
    decay: each step scales the mass a token has received so far by `decay` before adding the
        new query's (`compress.h2o.accumulate`). 1 is H2O's sum, which favours tokens that have
        been in the cache longest; below 1 a token's score is mostly the mass of the last
        1 / (1 - decay) queries.
    """

    heavy: int | float
    recent: int | float
    sinks: int = 0
    observe: int = 0
    decay: float = 1.0

    def budget(self, capacity: int) -> tuple[int, int, int]:
        """(heavy, recent, sinks) in tokens for a cache of `capacity` tokens."""

        def tokens(v: int | float) -> int:
            return round(v * capacity) if isinstance(v, float) else v

        heavy, recent = tokens(self.heavy), tokens(self.recent)
        if heavy + recent + self.sinks > capacity:
            raise RecipeError(
                f"h2o budget heavy={heavy} + recent={recent} + sinks={self.sinks} tokens is larger "
                f"than the cache capacity {capacity}; allowed: a total of at most {capacity}"
            )
        if recent < 1:
            raise RecipeError(
                f"h2o.recent resolves to {recent} tokens at capacity {capacity}; allowed: at least "
                "1 (the newest token must stay in the cache)"
            )
        return heavy, recent, self.sinks


@dataclass(frozen=True)
class Recipe:
    """A complete compression configuration; see the module docstring.

    window: full-precision tokens kept before they are compressed; a full window is compressed as
        one chunk and never revisited (GEAR's streaming buffer, KIVI's residual). With h2o (which
        compresses each token on its own) the newest `window` tokens are kept in full precision
        as well as in their slots and attended from there; at most h2o.recent tokens.
    loops: power-iteration loops for the low-rank factors.
    seed: seed of the power iteration's starting vectors and of the rotation's sign flips, so
        compression is deterministic.
    rotate: rotate each head's q, k and v by a fixed Hadamard matrix with seeded random sign flips
        before caching (`gearfx.compress.rotation`); attention is unchanged, quantization error is
        spread over all channels. Needs a power-of-2 head_dim.
    sinks: the first `sinks` positions of the sequence are also kept exactly, in full precision,
        and attended from there (attention sinks); they are left out of their chunk's ranges,
        outliers and low-rank fit. Not with h2o, which has its own sinks.
    layers: per-layer overrides, as (layer index, complete Recipe for that layer) pairs (YAML keys:
        an index, or an inclusive range "15-29").
    """

    name: str
    description: str = ""
    key: TensorSpec = TensorSpec(axis="channel")
    value: TensorSpec = TensorSpec(axis="token")
    window: int = 64
    loops: int = 3
    seed: int = 0
    rotate: bool = False
    sinks: int = 0
    h2o: H2O | None = None
    layers: tuple[tuple[int, Recipe], ...] = field(default=())

    @property
    def compresses(self) -> bool:
        """Whether anything is quantized (otherwise the cache stays in full precision)."""
        return self.key.quantized or self.value.quantized

    def for_layer(self, index: int) -> Recipe:
        """The recipe that applies to decoder layer `index` (its override, if any)."""
        return dict(self.layers).get(index, self)

    def check_model(self, head_dim: int, num_layers: int) -> None:
        """Raise RecipeError if this recipe cannot apply to a model of this shape."""
        for index, _ in self.layers:
            if index >= num_layers:
                raise RecipeError(
                    f"recipe {self.name!r}: layers.{index} overrides a layer the model does not "
                    f"have; allowed: 0..{num_layers - 1}"
                )
        for r in [self] + [r for _, r in self.layers]:
            r.check_head_dim(head_dim)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise RecipeError if this recipe (not its layer overrides) cannot store heads of
        `head_dim` channels. The cache's layout asks too: a store laid out for a head_dim the
        recipe does not fit would have empty scale groups, and the kernels would read past it."""
        if self.rotate and (head_dim < 1 or head_dim & (head_dim - 1)):
            raise RecipeError(
                f"recipe {self.name!r}: rotate=true needs a power-of-2 head_dim (Hadamard), the "
                f"model's is {head_dim}; allowed: rotate=false for this model"
            )
        for part, spec in (("key", self.key), ("value", self.value)):
            if spec.quantized and spec.axis == "token" and head_dim % spec.group:
                raise RecipeError(
                    f"recipe {self.name!r}: {part}.group={spec.group} channels does not divide "
                    f"head_dim={head_dim}; allowed: a divisor of {head_dim}"
                )
            if spec.quantized and head_dim * spec.bits % 8:
                raise RecipeError(
                    f"recipe {self.name!r}: {part}.bits={spec.bits} cannot pack head_dim="
                    f"{head_dim} channels into whole bytes"
                )
            rank = spec.resolve_rank(self.window)
            if rank > min(self.window, head_dim):
                raise RecipeError(
                    f"recipe {self.name!r}: {part}.rank={spec.rank} (rank {rank}) exceeds "
                    f"min(window={self.window}, head_dim={head_dim}); allowed: at most "
                    f"{min(self.window, head_dim)}"
                )


def _fail(recipe: str, path: str, value: Any, allowed: str) -> RecipeError:
    return RecipeError(f"recipe {recipe!r}: field {path!r} = {value!r} is not allowed; allowed: {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, float)


def _check_keys(recipe: str, path: str, data: Any, allowed: tuple[str, ...]) -> None:
    if not isinstance(data, Mapping):
        raise _fail(recipe, path or "<recipe>", data, "a mapping of " + ", ".join(allowed))
    for k in data:
        if k not in allowed:
            where = f"{path}.{k}" if path else str(k)
            raise RecipeError(
                f"recipe {recipe!r}: unknown field {where!r}; allowed fields: {', '.join(allowed)}"
            )


def _tensor_spec(recipe: str, path: str, data: Mapping, base: TensorSpec, window: int) -> TensorSpec:
    _check_keys(recipe, path, data, tuple(f.name for f in dataclasses.fields(TensorSpec)))
    spec = dataclasses.replace(base, **data)
    p = path + "."
    if not _is_int(spec.bits) or spec.bits not in BITS:
        raise _fail(recipe, p + "bits", spec.bits, "2, 3, 4, 5, 6, 7, 8, or 16 (no quantization)")
    if spec.axis not in AXES:
        raise _fail(recipe, p + "axis", spec.axis, "'channel' or 'token'")
    if not _is_int(spec.group) or spec.group < 1:
        raise _fail(recipe, p + "group", spec.group, "a positive integer")
    if spec.quantized and spec.axis == "channel" and window % spec.group:
        raise _fail(recipe, p + "group", spec.group, f"a divisor of window={window} (tokens)")
    if not ((_is_int(spec.rank) and spec.rank >= 0) or (_is_float(spec.rank) and 0 < spec.rank < 1)):
        raise _fail(recipe, p + "rank", spec.rank, "an integer >= 0 or a fraction in (0, 1) of the window")
    if not (isinstance(spec.outliers, (int, float)) and not isinstance(spec.outliers, bool)
            and 0 <= spec.outliers <= 0.5):
        raise _fail(recipe, p + "outliers", spec.outliers, "a fraction in [0, 0.5]")
    spec = dataclasses.replace(spec, outliers=float(spec.outliers))
    if not spec.quantized and (spec.rank or spec.outliers):
        raise _fail(recipe, p + "rank" if spec.rank else p + "outliers",
                    spec.rank or spec.outliers, "0 when bits is 16: there is no error to correct")
    return spec


def _h2o(recipe: str, data: Any) -> H2O | None:
    if data is None:
        return None
    _check_keys(recipe, "h2o", data, ("heavy", "recent", "sinks", "observe", "decay"))
    for k in ("heavy", "recent"):
        if k not in data:
            raise RecipeError(f"recipe {recipe!r}: field 'h2o.{k}' is missing; it is required with h2o")
        v = data[k]
        if not ((_is_int(v) and v >= 0) or (_is_float(v) and 0 <= v <= 1)):
            raise _fail(recipe, f"h2o.{k}", v, "a token count >= 0 or a fraction in [0, 1] of the capacity")
    sinks = data.get("sinks", 0)
    if not _is_int(sinks) or sinks < 0:
        raise _fail(recipe, "h2o.sinks", sinks, "an integer >= 0")
    observe = data.get("observe", 0)
    if not _is_int(observe) or observe < 0:
        raise _fail(recipe, "h2o.observe", observe, "an integer >= 0 (0: every prompt query)")
    decay = data.get("decay", 1.0)
    if not ((_is_float(decay) or _is_int(decay)) and 0 < decay <= 1):
        raise _fail(recipe, "h2o.decay", decay, "a number in (0, 1] (1: H2O's sum)")
    return H2O(heavy=data["heavy"], recent=data["recent"], sinks=sinks, observe=observe, decay=float(decay))


_LAYER_FIELDS = ("key", "value", "window", "loops", "h2o")
_FIELDS = ("name", "description", "seed", "rotate", "sinks", "layers") + _LAYER_FIELDS


def _body(name: str, data: Mapping, base: Recipe, path: str = "") -> Recipe:
    """Apply the compression fields of `data` on top of `base` and validate the result."""
    p = path + "." if path else ""
    window = data.get("window", base.window)
    if not _is_int(window) or window < 1:
        raise _fail(name, p + "window", window, "a positive integer (tokens)")
    loops = data.get("loops", base.loops)
    if not _is_int(loops) or loops < 1:
        raise _fail(name, p + "loops", loops, "a positive integer")
    key = _tensor_spec(name, p + "key", data.get("key", {}), base.key, window)
    value = _tensor_spec(name, p + "value", data.get("value", {}), base.value, window)
    h2o = _h2o(name, data["h2o"]) if "h2o" in data else base.h2o
    if h2o is not None:
        # Eviction overwrites single-token slots, so each token must be compressible on its own.
        for part, spec in (("key", key), ("value", value)):
            if spec.quantized and spec.axis != "token":
                raise _fail(name, f"{p}{part}.axis", spec.axis,
                            "'token' with h2o (slots hold one token each)")
            if spec.rank:
                raise _fail(name, f"{p}{part}.rank", spec.rank,
                            "0 with h2o (low-rank factors span a chunk; slots hold one token each)")
    return dataclasses.replace(base, key=key, value=value, window=window, loops=loops, h2o=h2o, layers=())


def parse_recipe(data: Any, name: str | None = None) -> Recipe:
    """Build a validated Recipe from a mapping (as read from YAML)."""
    label = name or (data.get("name") if isinstance(data, Mapping) else None) or "<unnamed>"
    _check_keys(label, "", data, _FIELDS)
    name = data.get("name", name)
    if not isinstance(name, str) or not name:
        raise _fail(label, "name", name, "a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail(name, "description", description, "a string")
    seed = data.get("seed", 0)
    if not _is_int(seed):
        raise _fail(name, "seed", seed, "an integer")
    rotate = data.get("rotate", False)
    if not isinstance(rotate, bool):
        raise _fail(name, "rotate", rotate, "true or false")
    sinks = data.get("sinks", 0)
    if not _is_int(sinks) or sinks < 0:
        raise _fail(name, "sinks", sinks, "an integer >= 0 (tokens)")
    recipe = _body(name, data, Recipe(name=name, description=description, seed=seed, rotate=rotate,
                                      sinks=sinks))
    if sinks and recipe.h2o is not None:
        raise _fail(name, "sinks", sinks, "0 with h2o (use h2o.sinks: eviction keeps its own sinks)")
    if sinks and not recipe.compresses:
        raise _fail(name, "sinks", sinks, "0 when nothing is quantized: every position is already exact")
    overrides = data.get("layers", {}) or {}
    if not isinstance(overrides, Mapping):
        raise _fail(name, "layers", overrides, "a mapping from layer index to overrides")
    layers = {}
    for key, override in overrides.items():
        _check_keys(name, f"layers.{key}", override, _LAYER_FIELDS)
        body = _body(name, override, recipe, f"layers.{key}")
        for index in _layer_range(name, key):
            if index in layers:
                raise _fail(name, "layers", key, "each layer overridden once")
            layers[index] = body
    return dataclasses.replace(recipe, layers=tuple(sorted(layers.items())))


def _layer_range(recipe: str, key: Any) -> range:
    """The layers a `layers` key names: an index (3) or an inclusive range ("15-29")."""
    if _is_int(key) and key >= 0:
        return range(key, key + 1)
    first, sep, last = str(key).partition("-")
    if sep and first.isdigit() and last.isdigit() and int(first) <= int(last):
        return range(int(first), int(last) + 1)
    raise _fail(recipe, "layers", key, "layer indices as integers >= 0, or inclusive ranges like '15-29'")


def list_recipes() -> list[str]:
    """Names of the recipes shipped with gearfx."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml"))


def load_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A shipped recipe by name, or a YAML file by path; a Recipe is returned as is."""
    if isinstance(recipe, Recipe):
        return recipe
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        text, default_name = path.read_text(), path.stem
    elif str(recipe) in list_recipes():
        text, default_name = resources.files(__name__).joinpath(f"{recipe}.yaml").read_text(), str(recipe)
    else:
        raise RecipeError(
            f"unknown recipe {str(recipe)!r}; shipped recipes: {', '.join(list_recipes())} "
            "(or pass the path of a .yaml file)"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {default_name!r} is not valid YAML: {e}") from e
    if not isinstance(data, Mapping):
        raise RecipeError(
            f"recipe {default_name!r}: the YAML document is {type(data).__name__}, "
            "not a mapping of recipe fields"
        )
    return parse_recipe(data, name=default_name)


__all__ = ["AXES", "BITS", "H2O", "Recipe", "RecipeError", "TensorSpec", "list_recipes",
           "load_recipe", "parse_recipe"]

import dataclasses

import pytest
import torch
import yaml

from gearfx.compress.layout import cache_layout
from gearfx.recipes import H2O, Recipe, RecipeError, TensorSpec, list_recipes, load_recipe, parse_recipe

SHIPPED = {"fp16", "kivi-4bit", "kivi-2bit", "gear-paper-4bit", "gear-paper-2bit", "h2o", "gear-4bit", "gear-2bit",
           "gear-4bit-h2o", "lossless", "balanced", "compact"}


def test_shipped_recipes_load_and_are_immutable():
    assert SHIPPED <= set(list_recipes())
    for name in list_recipes():
        r = load_recipe(name)
        assert isinstance(r, Recipe) and r.name == name and r.description
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.window = 3


def test_faithful_recipes_keep_the_papers_configurations():
    for bits in (4, 2):
        kivi = load_recipe(f"kivi-{bits}bit")
        assert (kivi.window, kivi.key, kivi.value) == (128, TensorSpec(bits, "channel", 32), TensorSpec(bits, "token", 32))
        assert not kivi.rotate and not kivi.sinks
        paper = load_recipe(f"gear-paper-{bits}bit")
        assert not paper.rotate and not paper.sinks and paper.key.group == paper.value.group == 32
        assert paper.key.outliers == paper.value.outliers == 0.02
        assert paper.key.rank == paper.value.rank == (0.02 if bits == 4 else 0.05)
    h2o = load_recipe("h2o")
    assert not h2o.compresses and (h2o.h2o.heavy, h2o.h2o.recent) == (0.25, 0.25)


def test_fp16_compresses_nothing_and_gear_compresses():
    assert not load_recipe("fp16").compresses and load_recipe("fp16").h2o is None
    gear = load_recipe("gear-4bit")
    assert gear.key.bits == 4 and gear.key.axis == "channel" and gear.value.axis == "token"
    assert gear.key.rank >= 1 and gear.key.outliers > 0


def test_load_from_yaml_file_with_layer_override(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({
        "key": {"bits": 4, "rank": 0.05}, "value": {"bits": 2, "axis": "token"}, "window": 64,
        "layers": {0: {"key": {"bits": 8}}},
    }))
    r = load_recipe(path)
    assert r.name == "mine" and r.key.resolve_rank(64) == 3
    assert r.for_layer(0).key.bits == 8 and r.for_layer(0).value.bits == 2
    assert r.for_layer(1) is r


def test_h2o_budget_in_tokens_and_fractions():
    assert H2O(heavy=0.1, recent=0.1, sinks=4).budget(1000) == (100, 100, 4)
    assert H2O(heavy=10, recent=20).budget(100) == (10, 20, 0)
    with pytest.raises(RecipeError, match="larger than the cache capacity 32"):
        H2O(heavy=20, recent=20).budget(32)


def test_an_h2o_window_must_fit_in_the_recent_tokens():
    """The window's tokens are attended from full precision in place of their slots, so each must
    still hold one: a window longer than the recent tokens is an error at the capacity that makes it so."""
    data = {"name": "w", "window": 32, "key": {"bits": 4, "axis": "token"}, "value": {"bits": 4, "axis": "token"},
            "h2o": {"heavy": 0.25, "recent": 0.25}}
    assert "window.key" in cache_layout(parse_recipe(data), 1, 2, 64, 128, torch.float32)  # 32 recent
    with pytest.raises(RecipeError, match=r"field 'window' = 32 .* h2o.recent resolving to 16 tokens at capacity 64"):
        cache_layout(parse_recipe(data), 1, 2, 64, 64, torch.float32)


@pytest.mark.parametrize("data, field, allowed", [
    ({"colour": 1}, "colour", "allowed fields"),
    ({"key": {"bits": 9}}, "key.bits", "2, 3, 4, 5, 6, 7, 8, or 16"),
    ({"key": {"bits": True}}, "key.bits", "2, 3, 4, 5, 6, 7, 8, or 16"),
    ({"value": {"axis": "row"}}, "value.axis", "'channel' or 'token'"),
    ({"key": {"bits": 4, "rank": -1}}, "key.rank", "an integer >= 0"),
    ({"key": {"bits": 4, "rank": 1.5}}, "key.rank", "fraction in (0, 1)"),
    ({"key": {"bits": 4, "outliers": 0.9}}, "key.outliers", "[0, 0.5]"),
    ({"key": {"bits": 16, "rank": 2}}, "key.rank", "0 when bits is 16"),
    ({"window": 64, "key": {"bits": 4, "group": 48}}, "key.group", "a divisor of window=64"),
    ({"window": 0}, "window", "a positive integer"),
    ({"loops": 0}, "loops", "a positive integer"),
    ({"h2o": {"heavy": 0.1}}, "h2o.recent", "required"),
    ({"h2o": {"heavy": -3, "recent": 1}}, "h2o.heavy", "token count"),
    ({"h2o": {"heavy": 1, "recent": 1, "sinks": 0.5}}, "h2o.sinks", "integer >= 0"),
    ({"h2o": {"heavy": 1, "recent": 1, "observe": -8}}, "h2o.observe", "integer >= 0"),
    ({"h2o": {"heavy": 1, "recent": 1, "decay": 0}}, "h2o.decay", "number in (0, 1]"),
    ({"h2o": {"heavy": 1, "recent": 1, "decay": 1.5}}, "h2o.decay", "number in (0, 1]"),
    ({"h2o": {"heavy": 1, "recent": 1}, "key": {"bits": 4, "axis": "channel"}}, "key.axis", "'token' with h2o"),
    ({"h2o": {"heavy": 1, "recent": 1}, "key": {"bits": 4, "axis": "token", "rank": 1}}, "key.rank", "0 with h2o"),
    ({"layers": {0: {"key": {"bits": 1}}}}, "layers.0.key.bits", "2, 3, 4"),
    ({"layers": {0: {"name": "x"}}}, "layers.0.name", "allowed fields"),
    ({"layers": {"5-2": {"loops": 2}}}, "layers", "inclusive ranges like '15-29'"),
    ({"layers": {"0-3": {"loops": 2}, 2: {"loops": 3}}}, "layers", "each layer overridden once"),
])
def test_bad_recipes_name_field_value_and_rule(data, field, allowed):
    with pytest.raises(RecipeError) as e:
        parse_recipe({"name": "bad", **data})
    assert repr(field) in str(e.value) or field in str(e.value)
    assert allowed in str(e.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="not a mapping"):
        load_recipe(path)


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(RecipeError, match="shipped recipes: .*gear-4bit"):
        load_recipe("gear-5bit")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("missing.yaml")


def test_check_model_shapes():
    r = parse_recipe({"name": "r", "value": {"bits": 4, "axis": "token", "group": 48}})
    with pytest.raises(RecipeError, match="value.group=48 channels does not divide head_dim=64"):
        r.check_model(head_dim=64, num_layers=2)
    r = parse_recipe({"name": "r", "key": {"bits": 4, "rank": 80}, "window": 128})
    with pytest.raises(RecipeError, match=r"key.rank=80 .* exceeds min\(window=128, head_dim=64\)"):
        r.check_model(head_dim=64, num_layers=2)
    r = parse_recipe({"name": "r", "layers": {5: {"loops": 2}}})
    with pytest.raises(RecipeError, match="layers.5 .* allowed: 0..1"):
        r.check_model(head_dim=64, num_layers=2)


def test_a_layout_for_a_head_dim_the_recipe_cannot_store_is_an_error():
    # its value scales would be [.., 0] a token and the kernels would read past them
    with pytest.raises(RecipeError, match="value.group=64 channels does not divide head_dim=32"):
        cache_layout(load_recipe("gear-4bit"), 1, 2, 32, 256, torch.float16)


def test_layer_ranges_override_each_layer_in_them():
    r = parse_recipe({"name": "r", "key": {"bits": 5}, "layers": {"1-2": {"key": {"bits": 6}}, 4: {"loops": 2}}})
    assert [i for i, _ in r.layers] == [1, 2, 4]
    assert [r.for_layer(i).key.bits for i in range(5)] == [5, 6, 6, 5, 5]
    assert r.for_layer(4).loops == 2 and r.for_layer(4).key.bits == 5

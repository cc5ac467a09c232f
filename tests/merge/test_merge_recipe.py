"""Recipe parsing and parameter resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.errors import RecipeError
from shoal.merge.params import TensorPosition, interpolate_gradient, is_unset, resolve_first, resolve_value
from shoal.merge.recipe import FilterValue, load_recipe, parse_recipe

MERGEKIT_TIES = """
models:
  - model: org/base
  - model: org/math
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: org/code
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: org/base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""

MERGEKIT_SLERP_SLICES = """
slices:
  - sources:
      - model: a
        layer_range: [0, 32]
      - model: b
        layer_range: [0, 32]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_mergekit_models_recipe_parses() -> None:
    data = __import__("yaml").safe_load(MERGEKIT_TIES)
    recipe = parse_recipe(data)
    assert recipe.merge_method == "ties"
    assert recipe.source_models() == ["org/base", "org/math", "org/code"]
    assert recipe.models[1].parameters["density"] == [1, 0.7, 0.1]
    assert recipe.parameters["normalize"] is True
    assert recipe.dtype == "bfloat16"


def test_mergekit_slices_recipe_parses(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(MERGEKIT_SLERP_SLICES)
    recipe = load_recipe(path)
    t = recipe.parameters["t"]
    assert isinstance(t, list) and isinstance(t[0], FilterValue)
    assert t[0].filter == "self_attn" and t[2].filter is None
    assert recipe.slices[0].sources[1].layer_range == (0, 32)


def test_round_trip_through_yaml() -> None:
    recipe = parse_recipe(__import__("yaml").safe_load(MERGEKIT_SLERP_SLICES))
    again = parse_recipe(__import__("yaml").safe_load(recipe.to_yaml()))
    assert again == recipe


@pytest.mark.parametrize("text, fragment", [
    ("merge_method: linear\nmodels: [{model: a}]\nmodles: []\n", "unknown key 'modles'"),
    ("merge_method: linear\nmodels: [{model: a, paramters: {weight: 1}}]\n", "unknown key 'paramters'"),
    ("merge_method: linear\n", "exactly one of 'models', 'slices' or 'modules'"),
    ("merge_method: linear\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n",
     "exactly one of"),
    ("merge_method: linear\nmodels: [{model: a}]\ndtype: float64\n", "dtype"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [3, 1]}]}]\n", "layer_range"),
    ("merge_method: slerp\nslices: [{sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]}]\n",
     "equal length"),
    ("- just\n- a list\n", "mapping"),
    ("merge_method: linear\nmodels: [{model: a}]\ntokenizer_source: union\n", "union"),
])
def test_bad_recipes_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_python_yaml_tags_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("merge_method: !!python/object/apply:os.system ['echo pwned']\nmodels: []\n")
    with pytest.raises(RecipeError, match="refused YAML tag"):
        load_recipe(path)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("models: [\n")
    with pytest.raises(RecipeError, match="invalid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


def test_gradient_interpolation_matches_hand_values() -> None:
    anchors = [0.0, 1.0, 0.0]
    assert interpolate_gradient(anchors, 0.0) == 0.0
    assert interpolate_gradient(anchors, 0.25) == pytest.approx(0.5)
    assert interpolate_gradient(anchors, 0.5) == pytest.approx(1.0)
    assert interpolate_gradient(anchors, 1.0) == 0.0
    assert interpolate_gradient([3.0], 0.7) == 3.0
    # 5 layers over anchors [0, 1]: layer i -> i / 4
    for layer in range(5):
        pos = TensorPosition(f"model.layers.{layer}.mlp.up_proj.weight", layer, 5)
        assert resolve_value([0.0, 1.0], pos) == pytest.approx(layer / 4)


def test_tensors_outside_the_stack_take_the_first_anchor_and_one_layer_slices_the_last() -> None:
    """mergekit plans the tensors outside the layers at t = 0 and a one-layer slice at t = 1."""
    embed = TensorPosition("model.embed_tokens.weight", None, 4)
    head = TensorPosition("lm_head.weight", None, 4)
    norm = TensorPosition("model.norm.weight", None, 1)
    assert resolve_value([0.2, 0.9], embed) == pytest.approx(0.2)
    assert resolve_value([0.2, 0.9], head) == pytest.approx(0.2)
    assert resolve_value([0.2, 0.5, 0.9], norm) == pytest.approx(0.2)
    only_layer = TensorPosition("model.layers.3.mlp.up_proj.weight", 0, 1)
    assert resolve_value([0.2, 0.5, 0.9], only_layer) == pytest.approx(0.9)


def test_filter_star_matches_every_tensor_and_other_filters_are_plain_substrings() -> None:
    star = [FilterValue(filter="*", value=0.25), FilterValue(value=1.0)]
    glob = [FilterValue(filter="mlp.*", value=0.25), FilterValue(value=1.0)]
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        position = TensorPosition(name, None, 4)
        assert resolve_value(star, position) == pytest.approx(0.25)
        assert resolve_value(glob, position) == pytest.approx(1.0)  # no glob: "mlp.*" is a literal


def test_filters_pick_the_first_match_and_fall_back() -> None:
    value = [FilterValue(filter="self_attn", value=0.1), FilterValue(filter="mlp", value=[0.0, 1.0]),
             FilterValue(value=0.5)]
    attn = TensorPosition("model.layers.1.self_attn.q_proj.weight", 1, 2)
    mlp = TensorPosition("model.layers.1.mlp.up_proj.weight", 1, 2)
    norm = TensorPosition("model.norm.weight", None, 2)
    assert resolve_value(value, attn) == pytest.approx(0.1)
    assert resolve_value(value, mlp) == pytest.approx(1.0)
    assert resolve_value(value, norm) == pytest.approx(0.5)
    only_attn = [FilterValue(filter="self_attn", value=0.1)]
    assert is_unset(resolve_value(only_attn, mlp))
    # a model-level value that does not match falls back to the global one
    assert resolve_first([only_attn, 0.7], mlp) == pytest.approx(0.7)

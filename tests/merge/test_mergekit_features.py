"""mergekit's recipe features and flags through ``shoal merge`` (issue #13), on tiny local models.

Each test goes through the CLI and checks what a user sees (exit code, stderr lines, files
written); expected values are computed here from the source files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shoal.cli.main import cli


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(args: list) -> "click.testing.Result":  # type: ignore[name-defined]  # noqa: F821
    return CliRunner().invoke(cli, [str(a) for a in args])


def _warnings(result) -> list[str]:  # type: ignore[no-untyped-def]
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


@pytest.fixture(scope="module")
def trio(tiny_model_dir):  # type: ignore[no-untyped-def]
    base = tiny_model_dir("llama_base", "llama", seed=1)
    return base, tiny_model_dir("llama_a", "llama", seed=2, base=base), tiny_model_dir("llama_b", "llama", seed=3, base=base)


def test_a_parameter_the_method_ignores_runs_with_one_warning(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    _, a, b = trio
    recipe = _recipe(tmp_path / "r.yaml", {
        "merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.3},
        "models": [{"model": str(a), "parameters": {"weight": 0.6}}, {"model": str(b), "parameters": {"weight": 0.4}}]})
    result = _run(["merge", recipe, tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    assert _warnings(result) == ["warning: parameter 'weight' has no effect on method 'slerp' "
                                 "(mergekit accepts and ignores it too)"]
    plain = _recipe(tmp_path / "plain.yaml", {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.3},
                                               "models": [{"model": str(a)}, {"model": str(b)}]})
    assert _run(["merge", plain, tmp_path / "plain", "-q"]).exit_code == 0
    got, expected = _weights(tmp_path / "out"), _weights(tmp_path / "plain")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_a_typo_stays_an_error_that_names_it(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    base, a, b = trio
    recipe = _recipe(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": str(base), "compat": "mergekit",
        "models": [{"model": str(a), "parameters": {"wieght": 0.5, "density": 0.5}}, {"model": str(b)}]})
    result = _run(["merge", recipe, tmp_path / "out"])
    assert result.exit_code == 2
    assert "unknown parameter 'wieght' for method 'ties'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_int8_mask_is_accepted_silently_and_changes_nothing(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    base, a, b = trio
    recipe = {"merge_method": "ties", "base_model": str(base), "compat": "mergekit",
              "models": [{"model": str(a), "parameters": {"density": 0.5, "weight": 0.7}},
                         {"model": str(b), "parameters": {"density": 0.5, "weight": 0.3}}]}
    with_mask = _recipe(tmp_path / "mask.yaml", {**recipe, "parameters": {"int8_mask": True}})
    result = _run(["merge", with_mask, tmp_path / "mask", "-q"])
    assert result.exit_code == 0 and _warnings(result) == []
    assert _run(["merge", _recipe(tmp_path / "r.yaml", recipe), tmp_path / "plain", "-q"]).exit_code == 0
    got, expected = _weights(tmp_path / "mask"), _weights(tmp_path / "plain")
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_ties_rescale_keeps_each_task_vectors_l1_norm(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    base, a, _ = trio
    recipe = {"merge_method": "ties", "base_model": str(base), "compat": "mergekit", "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"density": 0.5}}]}
    scaled = _run(["merge", _recipe(tmp_path / "t.yaml", {**recipe, "parameters": {"rescale": True}}), tmp_path / "t", "-q"])
    plain = _run(["merge", _recipe(tmp_path / "f.yaml", {**recipe, "parameters": {"rescale": False}}), tmp_path / "f", "-q"])
    assert scaled.exit_code == 0 and plain.exit_code == 0 and _warnings(scaled) == []
    got, unscaled = _weights(tmp_path / "t"), _weights(tmp_path / "f")
    sources, tuned = _weights(base), _weights(a)
    for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
        dense = tuned[name].float() - sources[name].float()
        # one model: every kept entry agrees with the elected sign, so out - base is the trimmed vector
        kept, trimmed = got[name] - sources[name].float(), unscaled[name] - sources[name].float()
        assert float(kept.abs().sum()) == pytest.approx(float(dense.abs().sum()), rel=1e-5)
        assert torch.equal(kept != 0, trimmed != 0)
        ratio = float(dense.abs().sum() / trimmed.abs().sum())
        torch.testing.assert_close(kept, trimmed * ratio, rtol=1e-5, atol=1e-7)
    bad = _run(["merge", _recipe(tmp_path / "b.yaml", {**recipe, "parameters": {"rescale": 0.5}}), tmp_path / "b"])
    assert bad.exit_code == 2 and not (tmp_path / "b").exists()
    assert bad.stderr.strip().splitlines() == ["error: parameter 'rescale' must be true or false, got 0.5"]


def test_breadcrumbs_rescale_keeps_each_task_vectors_l1_norm(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    base, a, _ = trio
    recipe = _recipe(tmp_path / "r.yaml", {
        "merge_method": "breadcrumbs", "base_model": str(base), "compat": "mergekit",
        "parameters": {"rescale": True},
        "models": [{"model": str(a), "parameters": {"density": 0.5, "gamma": 0.1, "weight": 1.0}}]})
    assert _run(["merge", recipe, tmp_path / "out", "-q"]).exit_code == 0
    got, wb, wa = _weights(tmp_path / "out"), _weights(base), _weights(a)
    name = "model.layers.0.mlp.up_proj.weight"
    merged, dense = got[name] - wb[name], wa[name] - wb[name]
    kept = merged != 0
    assert 0.3 < float(kept.float().mean()) < 0.6
    torch.testing.assert_close(merged.abs().sum(), dense.abs().sum(), rtol=1e-5, atol=1e-6)
    ratio = merged[kept] / dense[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio[0])), rtol=1e-4, atol=1e-5)


def test_a_recipe_without_compat_says_which_mode_it_ran_in(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    base, a, b = trio
    recipe = {"merge_method": "dare_ties", "base_model": str(base),
              "models": [{"model": str(a), "parameters": {"density": 0.5, "weight": 0.5}}, {"model": str(b)}]}
    plain = _recipe(tmp_path / "plain.yaml", recipe)
    dry = _run(["merge", plain, tmp_path / "dry", "--dry-run"])
    assert dry.exit_code == 0 and not (tmp_path / "dry").exists()
    warning = _warnings(dry)
    assert len(warning) == 1 and "compat: mergekit" in warning[0] and "normalize defaults to true" in warning[0]
    assert "mode: paper (the default; `compat` not given)" in dry.stdout
    assert "differs from mergekit's `dare_ties`: normalize defaults to true" in dry.stdout

    result = _run(["merge", plain, tmp_path / "out", "-q"])
    assert result.exit_code == 0 and len(_warnings(result)) == 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- mode: paper (the default; `compat` not given)" in card
    assert "https://arxiv.org/abs/2311.03099" in card  # the method's paper
    saved = yaml.safe_load((tmp_path / "out" / "shoal_recipe.yaml").read_text())
    assert saved["compat"] == "paper"  # reruns in the same mode whatever the default becomes

    chosen = _recipe(tmp_path / "chosen.yaml", {**recipe, "compat": "mergekit"})
    result = _run(["merge", chosen, tmp_path / "chosen", "-q"])
    assert result.exit_code == 0 and _warnings(result) == []
    assert "- mode: mergekit (set in the recipe)" in (tmp_path / "chosen" / "README.md").read_text()


def test_della_epsilon_defaults_to_mergekits_under_compat(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    base, a, b = trio
    recipe = {"merge_method": "della", "base_model": str(base),
              "models": [{"model": str(a), "parameters": {"density": 0.5}}, {"model": str(b)}]}
    paper = _run(["merge", _recipe(tmp_path / "p.yaml", recipe), tmp_path / "p", "--dry-run"])
    compat = _run(["merge", _recipe(tmp_path / "m.yaml", {**recipe, "compat": "mergekit"}), tmp_path / "m", "--dry-run"])
    assert "epsilon=[0.1, 0.1]" in paper.stdout
    assert "epsilon=[0.15, 0.15]" in compat.stdout


def test_mergekit_flags_are_aliases_or_refused_in_one_line(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    _, a, b = trio
    recipe = _recipe(tmp_path / "r.yaml", {"merge_method": "linear",
                                          "models": [{"model": str(a)}, {"model": str(b)}]})
    result = _run(["merge", recipe, tmp_path / "out", "-q", "--out-shard-size", "20K", "--random-seed", "3",
                   "--no-cuda", "--copy-tokenizer", "--lazy-unpickle", "--allow-crimes", "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    sizes = {}
    for name, shard in index["weight_map"].items():
        sizes[shard] = sizes.get(shard, 0) + _weights(tmp_path / "out")[name].nbytes
    assert len(sizes) > 1 and all(size <= 20_000 for size in sizes.values() if size)
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in _weights(tmp_path / "out").values())
    refused = _run(["merge", recipe, tmp_path / "no", "--no-copy-tokenizer"])
    assert refused.exit_code == 64 and "--no-copy-tokenizer" in refused.stderr and not (tmp_path / "no").exists()
    clash = _run(["merge", recipe, tmp_path / "clash", "--cuda", "--device", "cpu"])
    assert clash.exit_code == 64 and "disagree" in clash.stderr


def test_out_exists_names_overwrite_and_json_reports_what_was_written(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    _, a, b = trio
    recipe = _recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]})
    out = tmp_path / "out"
    first = _run(["merge", recipe, out, "--json"])
    assert first.exit_code == 0
    report = json.loads(first.stdout)
    assert report["out"] == str(out) and report["tensors"] == len(_weights(out))
    assert report["bytes"] == sum(t.nbytes for t in _weights(out).values())
    again = _run(["merge", recipe, out])
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert _run(["merge", recipe, out, "--overwrite", "-q"]).exit_code == 0


def test_slice_base_model_merges_each_slice_against_its_own_base(tmp_path: Path, trio, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    base, a, b = trio
    other = tiny_model_dir("llama_other_base", "llama", seed=4, base=base)
    recipe = _recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base), "parameters": {"weight": 0.5}, "dtype": "float32",
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 1]}, {"model": str(base), "layer_range": [0, 1]}]},
                   {"sources": [{"model": str(b), "layer_range": [1, 2]}, {"model": str(other), "layer_range": [1, 2]}],
                    "base_model": str(other)}]})
    result = _run(["merge", recipe, tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    got, wbase, wa, wb, wo = (_weights(p) for p in (tmp_path / "out", base, a, b, other))
    up0, up1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(got[up0], wbase[up0] + 0.5 * (wa[up0] - wbase[up0]))
    torch.testing.assert_close(got[up1], wo[up1] + 0.5 * (wb[up1] - wo[up1]))
    # after the layers: the last slice, against its base
    torch.testing.assert_close(got["lm_head.weight"], wo["lm_head.weight"] + 0.5 * (wb["lm_head.weight"] - wo["lm_head.weight"]))


@pytest.mark.parametrize("template", ["chatml", "jinja"])
def test_chat_template_is_written_to_the_output_tokenizer(tmp_path: Path, tiny_zoo_model, template: str) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from shoal.checkpoint.chat_templates import BUILTIN_TEMPLATES

    a, b = tiny_zoo_model(1), tiny_zoo_model(2)
    value = "chatml" if template == "chatml" else "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    recipe = _recipe(tmp_path / "r.yaml", {"merge_method": "linear", "chat_template": value,
                                          "models": [{"model": str(a)}, {"model": str(b)}]})
    result = _run(["merge", recipe, tmp_path / "out", "-q"])
    assert result.exit_code == 0, result.output
    expected = BUILTIN_TEMPLATES["chatml"] if template == "chatml" else value
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == expected
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    if template == "chatml":
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    else:
        assert text == "[user] hi\n"


def test_a_chat_template_name_shoal_does_not_know_is_refused(tmp_path: Path, trio) -> None:  # type: ignore[no-untyped-def]
    _, a, b = trio
    recipe = _recipe(tmp_path / "r.yaml", {"merge_method": "linear", "chat_template": "vicuna",
                                          "models": [{"model": str(a)}, {"model": str(b)}]})
    result = _run(["merge", recipe, tmp_path / "out"])
    assert result.exit_code == 2 and "chat_template 'vicuna'" in result.stderr and "chatml" in result.stderr
    assert not (tmp_path / "out").exists()

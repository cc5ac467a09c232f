"""The model card (README.md) of a merged model, plus the recipe saved beside it."""

from __future__ import annotations

import re
from pathlib import Path

from shoal.checkpoint.hub import looks_like_hub_id

RECIPE_FILENAME = "shoal_recipe.yaml"
CARD_TAGS = ["shoal", "merge"]


def _code_block(text: str, language: str) -> str:
    """Fence ``text`` with more backticks than any run inside it, so it cannot close early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _hub_ids(names: list[str]) -> list[str]:
    """The names that are hub ids (``owner/name``) rather than local paths: card metadata may cite only those."""
    return [n for n in names if "/" in n and looks_like_hub_id(n) and not Path(n).exists()]


def render_model_card(
    *, sources: list[str], method: str, recipe_yaml: str, base_model: str | None = None, extra: str = ""
) -> str:
    """The README.md text: YAML metadata (tags, hub base models), sources, method and the full recipe."""
    from huggingface_hub import ModelCardData

    cited = _hub_ids(([base_model] if base_model else []) + [s for s in sources if s != base_model])
    data = ModelCardData(library_name="transformers", tags=list(CARD_TAGS), base_model=cited or None)
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        "# Merged model",
        "",
        f"This model was made with shoal by merging the models below with the `{method}` method.",
        "",
        "## Merge method",
        "",
        f"- method: `{method}`",
    ]
    if base_model:
        lines.append(f"- base model: `{base_model}`")
    lines += ["", "## Source models", ""]
    lines += [f"- `{source}`" for source in sources]
    lines += ["", "## Recipe", "", f"The recipe below is also saved as `{RECIPE_FILENAME}`.", ""]
    lines += [_code_block(recipe_yaml, "yaml"), ""]
    if extra.strip():
        lines += [extra.strip(), ""]
    return "\n".join(lines)


def write_model_card(
    out_dir: Path,
    *,
    sources: list[str],
    method: str,
    recipe_yaml: str,
    base_model: str | None = None,
    extra: str = "",
) -> None:
    """Write ``README.md`` (a huggingface_hub ModelCard) and the recipe to ``out_dir``."""
    from huggingface_hub import ModelCard

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    card = ModelCard(
        render_model_card(sources=sources, method=method, recipe_yaml=recipe_yaml, base_model=base_model, extra=extra)
    )
    card.save(out_dir / "README.md")
    recipe = recipe_yaml if recipe_yaml.endswith("\n") else recipe_yaml + "\n"
    (out_dir / RECIPE_FILENAME).write_text(recipe, encoding="utf-8")

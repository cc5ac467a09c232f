"""The model card (README.md) of a merged model, plus the recipe saved beside it.

The card's metadata cites the hub models it was made from (``base_model``): sources that are
hub ids, and, for a local source folder, the hub models its own card cites (a shoal merge of
hub models, a fine-tune saved with its card), so the lineage survives local steps.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from shoal.checkpoint.hub import looks_like_hub_id

RECIPE_FILENAME = "shoal_recipe.yaml"
CARD_TAGS = ["shoal", "merge"]


def _code_block(text: str, language: str) -> str:
    """Fence ``text`` with more backticks than any run inside it, so it cannot close early."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text.rstrip()}\n{fence}"


def _is_hub_id(name: str) -> bool:
    return "/" in name and looks_like_hub_id(name.split("@", 1)[0]) and not Path(name).exists()


def _hub_ids(names: list[str]) -> list[str]:
    """The names that are hub ids (``owner/name``) rather than local paths: card metadata may cite only those."""
    return [n for n in names if _is_hub_id(n)]


def card_base_models(folder: str | Path) -> list[str]:
    """The hub models a local model folder's own card cites as ``base_model`` (none without a card)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return []
    from huggingface_hub import metadata_load

    try:
        metadata = metadata_load(readme) or {}
    except Exception:  # a card that is not ours may be malformed; its lineage is then unknown
        return []
    cited = metadata.get("base_model") if isinstance(metadata, dict) else None
    names = [cited] if isinstance(cited, str) else list(cited or [])
    return [n for n in names if isinstance(n, str) and _is_hub_id(n)]


def known_base_models(sources: Sequence[str]) -> list[str]:
    """Hub ids among ``sources`` and those the cards of local source folders cite, in order."""
    cited: list[str] = []
    for source in sources:
        if _is_hub_id(source):
            cited.append(source.split("@", 1)[0])
        elif Path(source).is_dir():
            cited.extend(card_base_models(source))
    return list(dict.fromkeys(cited))


def render_model_card(
    *, sources: list[str], method: str, recipe_yaml: str, base_model: str | None = None, extra: str = "",
    method_paper: str | None = None, title: str = "Merged model", intro: str | None = None,
    recipe_language: str = "yaml", recipe_file: str | None = RECIPE_FILENAME, details: Sequence[str] = (),
) -> str:
    """The README.md text: YAML metadata (tags, hub base models), sources, method (with a link
    to its paper when given, and ``details``: one bullet each, e.g. the mode the merge ran in)
    and the full recipe; ``extra`` is appended as markdown."""
    from huggingface_hub.repocard_data import ModelCardData  # not the package's lazy root: see write_model_card

    ordered = ([base_model] if base_model else []) + [s for s in sources if s != base_model]
    cited = known_base_models(ordered)
    data = ModelCardData(library_name="transformers", tags=list(CARD_TAGS), base_model=cited or None)
    paper = f" ([paper]({method_paper}))" if method_paper else ""
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {title}",
        "",
        intro or f"This model was made with shoal by merging the models below with the `{method}` method.",
        "",
        "## Merge method",
        "",
        f"- method: `{method}`{paper}",
    ]
    lines += [f"- {detail}" for detail in details]
    if base_model:
        lines.append(f"- base model: `{base_model}`")
    lines += ["", "## Source models", ""]
    lines += [f"- `{source}`" for source in sources]
    saved = f"The recipe below is also saved as `{recipe_file}`." if recipe_file else ""
    lines += ["", "## Recipe", "", *([saved, ""] if saved else [])]
    lines += [_code_block(recipe_yaml, recipe_language), ""]
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
    method_paper: str | None = None,
    title: str = "Merged model",
    intro: str | None = None,
    recipe_language: str = "yaml",
    recipe_file: str | None = RECIPE_FILENAME,
    details: Sequence[str] = (),
) -> None:
    """Write ``README.md`` and, unless ``recipe_file`` is None, the recipe to ``out_dir``.

    The card's text is what ``huggingface_hub.ModelCard(text).save`` writes (its metadata is
    rendered by huggingface_hub's ``ModelCardData``, and ``ModelCard.load`` reads it back), written
    directly: ``huggingface_hub.repocard`` imports the hub client, a good part of a second in
    every merge.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render_model_card(sources=sources, method=method, recipe_yaml=recipe_yaml, base_model=base_model,
                             extra=extra, method_paper=method_paper, title=title, intro=intro,
                             recipe_language=recipe_language, recipe_file=recipe_file, details=details)
    with open(out_dir / "README.md", "w", newline="", encoding="utf-8") as handle:
        handle.write(text)
    if recipe_file:
        recipe = recipe_yaml if recipe_yaml.endswith("\n") else recipe_yaml + "\n"
        (out_dir / recipe_file).write_text(recipe, encoding="utf-8")

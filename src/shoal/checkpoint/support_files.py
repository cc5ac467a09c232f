"""Copy the non-weight files a model folder needs: config, generation config, tokenizer, chat template.

``config.json`` is rewritten with the caller's updates (dtype, layer count after layer
slicing, vocabulary size), the dtype under ``dtype`` only. Everything else is copied byte for byte; symlinks (as in the
hub cache) are followed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shoal.checkpoint.architecture import LAYER_COUNT_KEYS
from shoal.checkpoint.dtypes import BY_NAME
from shoal.checkpoint.reader import CheckpointReader
from shoal.errors import CheckpointError

CONFIG_FILE = "config.json"
SUPPORT_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
SUPPORT_FOLDERS = ("additional_chat_templates",)
DTYPE_KEY = "dtype"
LEGACY_DTYPE_KEY = "torch_dtype"  # transformers < 4.56; deprecated in 5
LAYER_TYPES_KEY = "layer_types"


def _support_dir(source: CheckpointReader | Path) -> Path:
    if isinstance(source, CheckpointReader):
        path = source.path
    else:
        path = Path(source)
    return path if path.is_dir() else path.parent


def dtype_name(value: Any) -> str:
    """``torch.bfloat16`` or ``"torch.bfloat16"`` -> ``"bfloat16"``, as config.json spells it."""
    name = str(value).removeprefix("torch.")
    if name not in BY_NAME:
        raise CheckpointError(f"{CONFIG_FILE}: unknown dtype {value!r} for key 'dtype'")
    return name


def _set_dotted(config: dict, key: str, value: Any) -> tuple[dict, str]:
    """Set ``config["a"]["b"]`` for key ``"a.b"``; return the innermost dict and last key."""
    *parents, last = key.split(".")
    target = config
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            raise CheckpointError(f"{CONFIG_FILE}: cannot update {key!r}: {part!r} is not a nested config")
        target = child
    target[last] = value
    return target, last


def _fit_layer_types(section: dict, layer_key: str) -> None:
    """Keep ``layer_types`` (one entry per layer, checked by transformers) as long as the layer count.

    A uniform list is extended or cut; a mixed one (e.g. Gemma 2's alternating sliding and
    full attention) cannot be guessed here, so it is removed and transformers rebuilds its
    default pattern. Callers that know the source layers pass ``layer_types`` explicitly.
    """
    layer_types = section.get(LAYER_TYPES_KEY)
    count = section.get(layer_key)
    if not isinstance(layer_types, list) or not isinstance(count, int) or len(layer_types) == count:
        return
    if layer_types and all(t == layer_types[0] for t in layer_types):
        section[LAYER_TYPES_KEY] = [layer_types[0]] * count
    else:
        del section[LAYER_TYPES_KEY]


def _dtype_sections(config: dict) -> list[dict]:
    """The config and its nested configs (``text_config``, ``vision_config``...), outermost first."""
    sections = [config]
    for value in config.values():
        if isinstance(value, dict):
            sections.extend(_dtype_sections(value))
    return sections


def update_config(config: dict, updates: dict[str, Any]) -> dict:
    """A copy of ``config`` with ``updates`` applied.

    Keys may be dotted to reach nested configs (``"text_config.num_hidden_layers"``).
    The dtype is written as ``dtype``, the key transformers 5 reads; the deprecated
    ``torch_dtype`` (which transformers 5 warns about whenever it is read) is renamed to it
    wherever the source config has it. A ``dtype`` (or ``torch_dtype``) update sets the
    section's dtype and, at the top level, that of every nested config that carries one.
    """
    result = json.loads(json.dumps(config))
    for section in _dtype_sections(result):
        if LEGACY_DTYPE_KEY in section:
            legacy = section.pop(LEGACY_DTYPE_KEY)
            section.setdefault(DTYPE_KEY, legacy)
    for key, value in updates.items():
        *parents, last = key.split(".")
        if last in (DTYPE_KEY, LEGACY_DTYPE_KEY):
            name = dtype_name(value)
            section, _ = _set_dotted(result, ".".join([*parents, DTYPE_KEY]), name)
            if not parents:
                for nested in _dtype_sections(result)[1:]:
                    if DTYPE_KEY in nested:
                        nested[DTYPE_KEY] = name
            continue
        section, last = _set_dotted(result, key, value)
        if last in LAYER_COUNT_KEYS and ".".join([*parents, LAYER_TYPES_KEY]) not in updates:
            _fit_layer_types(section, last)
    return result


def copy_support_files(
    source: CheckpointReader | Path, out_dir: Path, *, config_updates: dict | None = None
) -> None:
    """Copy config (updated), generation config, tokenizer and chat template files into ``out_dir``.

    ``source`` is a reader (its folder is used) or a folder. Files the source lacks are
    skipped; without a ``config.json`` nothing is written for the config.
    """
    folder = _support_dir(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = folder / CONFIG_FILE
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{config_path}: cannot read model config: {exc}") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: model config is not a JSON object")
        config = update_config(config, config_updates or {})
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in SUPPORT_FILES:
        path = folder / name
        if path.is_file():
            shutil.copyfile(path, out_dir / name)
    for name in SUPPORT_FOLDERS:
        path = folder / name
        if path.is_dir():
            shutil.copytree(path, out_dir / name, dirs_exist_ok=True)

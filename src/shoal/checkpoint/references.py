"""Model references: the one place where a name a user writes becomes a checkpoint location.

A reference is one of

- a local folder or file (``./out/merged``, ``model.safetensors``);
- a Hugging Face hub id, optionally pinned: ``owner/name`` or ``owner/name@revision``;
- ``SCHEME:REST`` for a scheme another part of shoal (or a third-party package) registers,
  such as ``zoo:small/math`` for the miniature world's models;
- a folder that a registered *folder rule* maps elsewhere, such as a finished ``shoal evolve``
  run folder standing for its merged model.

Schemes and folder rules are plug-ins: they are registered with :func:`register_scheme` and
:func:`register_folder_rule`, or declared as entry points in the groups ``shoal.references``
(``name = "module:resolver"``) and ``shoal.folder_rules``, which are loaded the first time a
reference needs them. That keeps this module at the bottom of the import graph: it never
imports the packages that plug into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from shoal.errors import CheckpointError

SCHEME_GROUP = "shoal.references"
FOLDER_RULE_GROUP = "shoal.folder_rules"

#: A scheme resolver takes the text after ``SCHEME:`` and returns another reference
#: (usually a local folder), which is resolved again.
SchemeResolver = Callable[[str], "str | Path"]
#: A folder rule takes an existing local folder and returns the folder it stands for, or None.
FolderRule = Callable[[Path], "Path | None"]

_SCHEME = re.compile(r"^([a-z][a-z0-9_+-]*):(?!//)(.*)$")
_schemes: dict[str, SchemeResolver] = {}
_folder_rules: dict[str, FolderRule] = {}
_loaded_groups: set[str] = set()


@dataclass(frozen=True)
class ModelLocation:
    """Where a reference points: a local path, or a hub id with its revision."""

    reference: str  # what the user wrote
    path: Path | None  # local file or folder, when local
    hub_id: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.hub_id}@{self.revision}" if self.revision else str(self.hub_id)


def register_scheme(name: str, resolver: SchemeResolver, *, replace: bool = False) -> None:
    """Make ``name:REST`` references resolve through ``resolver(REST)``."""
    if not re.fullmatch(r"[a-z][a-z0-9_+-]*", name):
        raise ValueError(f"scheme name {name!r}: lowercase letters, digits, '_', '+' or '-'")
    if name in _schemes and not replace and _schemes[name] is not resolver:
        raise ValueError(f"reference scheme {name!r} is already registered")
    _schemes[name] = resolver


def register_folder_rule(name: str, rule: FolderRule, *, replace: bool = False) -> None:
    """Let ``rule`` map existing local folders to the folder they stand for."""
    if name in _folder_rules and not replace and _folder_rules[name] is not rule:
        raise ValueError(f"folder rule {name!r} is already registered")
    _folder_rules[name] = rule


def _load_group(group: str) -> None:
    if group in _loaded_groups:
        return
    _loaded_groups.add(group)
    for entry in entry_points(group=group):
        target = entry.load()
        if group == SCHEME_GROUP:
            _schemes.setdefault(entry.name, target)
        else:
            _folder_rules.setdefault(entry.name, target)


def registered_schemes() -> list[str]:
    """The names of every scheme a reference may use."""
    _load_group(SCHEME_GROUP)
    return sorted(_schemes)


def split_revision(reference: str) -> tuple[str, str | None]:
    """``owner/name@rev`` -> (``owner/name``, ``rev``); anything without ``@`` is returned as is."""
    if "@" in reference and not Path(reference).exists():
        name, _, revision = reference.rpartition("@")
        if name and revision:
            return name, revision
    return reference, None


def resolve_reference(reference: str | Path, *, revision: str | None = None,
                      _depth: int = 0) -> ModelLocation:
    """Where ``reference`` points. Schemes and folder rules apply; nothing is downloaded.

    A local path that does not exist and is not a plausible hub id raises
    :class:`~shoal.errors.CheckpointError` naming it. ``revision`` applies to hub ids only
    and must not contradict an ``@revision`` written in the reference.
    """
    from shoal.checkpoint.hub import looks_like_hub_id

    if _depth > 8:
        raise CheckpointError(f"{reference}: reference schemes resolve in a loop")
    if isinstance(reference, Path):
        local = reference.expanduser()
        if not local.exists():
            raise CheckpointError(f"{reference}: no such file or folder")
        return ModelLocation(str(reference), _apply_folder_rules(local))
    text = str(reference)
    match = _SCHEME.match(text)
    if match and not Path(text).exists():
        scheme, rest = match.groups()
        _load_group(SCHEME_GROUP)
        if scheme not in _schemes:
            known = ", ".join(f"{name}:" for name in sorted(_schemes)) or "none"
            raise CheckpointError(f"{text}: unknown reference scheme {scheme!r} (known: {known})")
        target = _schemes[scheme](rest)
        resolved = resolve_reference(str(target), revision=revision, _depth=_depth + 1)
        return ModelLocation(text, resolved.path, resolved.hub_id, resolved.revision)
    local = Path(text).expanduser()
    if local.exists():
        return ModelLocation(text, _apply_folder_rules(local))
    name, written = split_revision(text)
    if written and revision and written != revision:
        raise CheckpointError(f"{text}: revision {written!r} contradicts the revision {revision!r} asked for")
    if looks_like_hub_id(name) and not name.startswith((".", "/", "~")):
        return ModelLocation(text, None, name, written or revision)
    raise CheckpointError(f"{text}: no such file or folder (and not a Hugging Face hub id)")


def _apply_folder_rules(folder: Path) -> Path:
    if not folder.is_dir():
        return folder
    _load_group(FOLDER_RULE_GROUP)
    for rule in _folder_rules.values():
        target = rule(folder)
        if target is not None:
            return Path(target)
    return folder


def resolve_model_ref(reference: str | Path) -> str:
    """What to open for ``reference``: the local file or folder it resolves to (schemes and
    folder rules applied), or, for a hub id, the reference as written (``owner/name@rev``),
    which :func:`shoal.checkpoint.open_checkpoint` downloads."""
    location = resolve_reference(reference)
    return str(location.path) if location.path is not None else str(reference)

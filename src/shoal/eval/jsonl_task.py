"""A task defined by the user's own JSONL data.

Each line is an object with ``prompt`` and ``target`` (and optionally ``choices``, a list of
continuations of which ``target`` is one, making it a multiple-choice example; ``completion``;
and ``split``). The path is either one file, whose lines go to the split named by their
``split`` field (``test`` when absent), or a folder of ``<split>.jsonl`` files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal, Sequence

from shoal.errors import TaskError
from shoal.eval.scoring import answer_match
from shoal.eval.task import SPLITS, Example


@dataclass(frozen=True)
class JsonlTask:
    """A :class:`~shoal.eval.task.Task` read from JSONL. Numeric targets are scored by number
    match, others by exact match of the first line (see :func:`shoal.eval.scoring.answer_match`)."""

    path: Path
    max_new_tokens: int = 32
    stop_strings: tuple[str, ...] = ("\n",)
    name: str = field(default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not self.name:
            object.__setattr__(self, "name", f"jsonl:{self.path}")
        if not self.path.exists():
            raise TaskError(f"{self.path}: no such JSONL file or folder")

    @cached_property
    def _splits(self) -> dict[str, tuple[Example, ...]]:
        if self.path.is_dir():
            files = {p.stem: p for p in sorted(self.path.glob("*.jsonl"))}
            if not files:
                raise TaskError(f"{self.path}: folder holds no <split>.jsonl files")
            for stem, file in files.items():
                if stem not in SPLITS:
                    raise TaskError(f"{file}: not a split name; expected one of "
                                    f"{', '.join(f'{s}.jsonl' for s in SPLITS)}")
            return {split: tuple(e for _, e in _read(p, split)) for split, p in files.items()}
        splits: dict[str, list[Example]] = {}
        for split, example in _read(self.path, "test"):
            splits.setdefault(split, []).append(example)
        return {split: tuple(examples) for split, examples in splits.items()}

    @property
    def kind(self) -> Literal["generate", "choice"]:
        for examples in self._splits.values():
            if examples:
                return "choice" if examples[0].choices else "generate"
        return "generate"

    def examples(self, split: str) -> Sequence[Example]:
        if split not in self._splits:
            known = ", ".join(self._splits) or "none"
            raise TaskError(f"task {self.name!r} has no split {split!r}; splits: {known}")
        return self._splits[split]

    def score(self, output: str, example: Example) -> float:
        if example.choices:
            return float(output == example.target)
        return answer_match(output, example.target)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    record: dict[str, object] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


class _DuplicateKey(Exception):
    pass


def _read(path: Path, default_split: str) -> list[tuple[str, Example]]:
    """(split, example) per non-blank line; TaskError naming ``path:line`` for a bad line."""
    records = []
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TaskError(f"{path}: cannot read ({err.strerror or err})") from None
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, as some editors write
        data = data[3:]
    kinds = set()
    # Split on bytes: str.splitlines would also cut at U+2028 and other separators inside strings.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TaskError(f"{where}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as err:
            raise TaskError(f"{where}: not valid JSON ({err.msg})") from None
        except _DuplicateKey as err:
            raise TaskError(f"{where}: field {err.args[0]!r} appears twice") from None
        except RecursionError:
            raise TaskError(f"{where}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise TaskError(f"{where}: expected a JSON object")
        for key in ("prompt", "target"):
            if not isinstance(record.get(key), str):
                raise TaskError(f"{where}: field {key!r} must be a string")
        unknown = set(record) - {"prompt", "target", "choices", "completion", "split"}
        if unknown:
            raise TaskError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        choices = record.get("choices")
        if choices is not None:
            if (not isinstance(choices, list) or not choices
                    or not all(isinstance(c, str) for c in choices)):
                raise TaskError(f"{where}: 'choices' must be a non-empty list of strings")
            if record["target"] not in choices:
                raise TaskError(f"{where}: target {record['target']!r} is not one of the choices")
            choices = tuple(choices)
        kinds.add(choices is not None)
        split = record.get("split", default_split)
        if split not in SPLITS:
            raise TaskError(f"{where}: unknown split {split!r}; splits: {', '.join(SPLITS)}")
        records.append((split, Example(record["prompt"], record["target"], choices=choices,
                                       completion=record.get("completion"))))
    if len(kinds) > 1:
        raise TaskError(f"{path}: mixes multiple-choice lines (with 'choices') and generation lines")
    return records

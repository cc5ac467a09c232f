"""Read a YAML file of plain data, refusing what a user did not mean: the loader recipes (and configs) use.

``yaml.safe_load`` already refuses tags that build Python objects. This loader also refuses

- text that is not UTF-8 (a binary file, a Latin-1 file): the error names the byte offset;
- a key given twice in one mapping (plain YAML keeps the last without a word): the error names
  the key and both lines;
- nesting deeper than :data:`MAX_DEPTH` (PyYAML composes recursively: a file nested 50,000 deep
  would exhaust Python's stack);
- aliases that expand to more than :data:`MAX_ALIASED_NODES` nodes in all (a "billion laughs"
  file: a few lines whose aliases of aliases stand for 10^9 values, which PyYAML loads as shared
  references but validation, the model card's copy of the recipe or a JSON dump would expand),
  and an alias inside its own anchor (a data structure that contains itself).

Every problem is raised as the caller's error class, with a message that names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from shoal.errors import ShoalError

MAX_DEPTH = 100  # mappings and lists inside each other; recipes need about six
MAX_ALIASED_NODES = 100_000  # values the aliases of one file stand for; a recipe reusing a block needs hundreds


class _Refused(Exception):
    """A problem found while composing; turned into the caller's error class with the file name."""


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliased = 0  # nodes the aliases so far stand for
        self._sizes: dict[int, int] = {}  # id(node) -> nodes in it, aliases expanded
        self._open: set[str] = set()  # anchors of the collections being composed

    def compose_node(self, parent: Any, index: Any) -> Any:  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep at line {mark.line + 1}")
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                if event.anchor in self._open:
                    raise _Refused(f"the alias *{event.anchor} at line {event.start_mark.line + 1} is inside its "
                                   "own anchor (a value that contains itself)")
                anchored = self.anchors.get(event.anchor)
                if anchored is not None:
                    self._aliased += self._size(anchored)
                    if self._aliased > MAX_ALIASED_NODES:
                        raise _Refused(f"aliases stand for more than {MAX_ALIASED_NODES:,} values in all (the "
                                       f"alias *{event.anchor} at line {event.start_mark.line + 1}); a file that "
                                       "expands like this is refused")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def _size(self, node: yaml.Node) -> int:
        """The number of nodes in ``node`` with its aliases expanded (memoized: a shared node is counted once)."""
        size = self._sizes.get(id(node))
        if size is None:
            size = 1
            if isinstance(node, yaml.SequenceNode):
                size += sum(self._size(child) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size += sum(self._size(k) + self._size(v) for k, v in node.value)
            self._sizes[id(node)] = size
        return size

    def compose_sequence_node(self, anchor: str | None) -> yaml.SequenceNode:  # type: ignore[override]
        return self._composing(anchor, super().compose_sequence_node)

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:  # type: ignore[override]
        return self._composing(anchor, super().compose_mapping_node)

    def _composing(self, anchor: str | None, compose: Any) -> Any:
        if anchor is None:
            return compose(anchor)
        self._open.add(anchor)
        try:
            return compose(anchor)
        finally:
            self._open.discard(anchor)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error says so below
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _Refused(f"key {key!r} appears twice in one mapping (lines {first} and {line})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: Path, *, error: type[ShoalError], what: str = "file", documents: bool = False) -> Any:
    """The plain data of the YAML file at ``path``; every problem is an ``error`` naming the file.

    With ``documents``, a list of every document of the file (``---`` separated), else its one document.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not a UTF-8 text file (byte {err.start} is {raw[err.start]:#04x}); "
                    f"save the {what} as UTF-8") from None
    loader = _StrictLoader(text)
    try:
        if documents:
            found = []
            while loader.check_data():
                found.append(loader.get_data())
            return found
        return loader.get_single_data()
    except _Refused as err:
        raise error(f"{path}: {err}") from None
    except yaml.constructor.ConstructorError as err:
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        if "constructor for the tag" in problem:
            raise error(f"{path}: refused YAML tag ({problem}); a {what} is plain data") from None
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}: invalid YAML{at}: {problem}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise error(f"{path}: invalid YAML{at}: {problem}") from None
    except RecursionError:  # deep nesting PyYAML recurses on beyond the composer (should not happen)
        raise error(f"{path}: nested too deeply to read") from None
    finally:
        loader.dispose()

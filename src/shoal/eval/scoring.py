"""Answer extraction and scoring for generation tasks."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_number(output: str) -> str | None:
    """The first number in ``output`` (``"-3"``, ``"12"``, ``"2.5"``), or None when there is none.

    Leading zeros and a trailing ``.0`` are normalized away so that ``"007"`` and ``"7.0"`` both
    read as ``"7"``.
    """
    match = _NUMBER.search(output)
    if match is None:
        return None
    text = match.group(0)
    value = float(text)
    if value.is_integer():
        return str(int(value))
    return repr(value)


def number_match(output: str, target: str) -> float:
    """1.0 when the first number in ``output`` equals ``target`` numerically, else 0.0."""
    found = extract_number(output)
    wanted = extract_number(target)
    return float(found is not None and found == wanted)


def first_line(output: str) -> str:
    """The output up to its first newline, stripped."""
    return output.split("\n", 1)[0].strip()


def normalize_words(text: str) -> str:
    """Lower-case, collapse whitespace."""
    return " ".join(text.lower().split())


def exact_match(output: str, target: str, *, stop: str | None = None) -> float:
    """1.0 when ``output`` (cut at the first ``stop`` string and at a newline) equals ``target``
    after whitespace and case normalization."""
    text = output
    if stop is not None and stop in text:
        text = text.split(stop, 1)[0]
    return float(normalize_words(first_line(text)) == normalize_words(target))

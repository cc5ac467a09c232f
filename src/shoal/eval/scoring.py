"""Answer extraction and scoring for generation tasks."""

from __future__ import annotations

import math
import re
from typing import Sequence

# A number: optional minus sign glued to it, digits with optional thousands separators
# ("1,234"), optional decimals. A comma not followed by exactly three digits ends the number,
# so "3, 4" reads as 3.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def extract_number(output: str) -> str | None:
    """The first number in ``output`` (``"-3"``, ``"12"``, ``"2.5"``), or None when there is none.

    Leading zeros, thousands separators and a trailing ``.0`` are normalized away, so that
    ``"007"``, ``"7.0"`` and ``"7"`` read alike and ``"1,234"`` reads as ``"1234"``.
    """
    match = _NUMBER.search(output)
    if match is None:
        return None
    text = match.group(0).replace(",", "")
    if "." not in text:
        return str(int(text))  # exact for integers of any size
    value = float(text)
    if value.is_integer():
        return str(int(value))
    return repr(value)


def is_number(text: str) -> bool:
    """True when ``text`` is one number and nothing else (surrounding spaces allowed)."""
    return _NUMBER.fullmatch(text.strip()) is not None


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


def answer_match(output: str, target: str) -> float:
    """Number match when ``target`` is a number, exact match of the first line otherwise."""
    if is_number(target):
        return number_match(output, target)
    return exact_match(output, target)


def mean_stderr(scores: Sequence[float]) -> float:
    """The standard error of the mean of per-example ``scores``, as lm-eval computes it:
    the sample standard deviation (divisor ``n - 1``) over ``sqrt(n)``.

    For 0/1 scores this is ``sqrt(p (1 - p) / (n - 1))``. It is undefined for fewer than two
    examples; 0.0 is returned then."""
    n = len(scores)
    if n < 2:
        return 0.0
    mean = sum(scores) / n
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return math.sqrt(variance / n)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(output: str, target: str, *, stop: str | None = None) -> float:
    """ROUGE-L F1 of ``output`` against ``target`` over lower-cased whitespace tokens (the
    metric of arXiv 2403.13187's VLM benchmarks): with ``L`` the longest common subsequence,
    ``P = L / len(output)``, ``R = L / len(target)``, ``F = 2PR / (P + R)``.

    ``output`` is cut at the first ``stop`` string and at a newline first. It is 1.0 exactly
    when the token sequences are equal, and 0.0 when either is empty.
    """
    text = output
    if stop is not None and stop in text:
        text = text.split(stop, 1)[0]
    predicted = normalize_words(first_line(text)).split()
    reference = normalize_words(target).split()
    if not predicted or not reference:
        return 0.0
    common = _lcs_length(predicted, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)

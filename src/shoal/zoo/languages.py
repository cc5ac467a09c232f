"""The two synthetic languages of the miniature world.

Language A uses English-looking words; language B has an invented word for every word of A
(a fixed bijection), the same word order, and shares the digits and the punctuation. The
lexicon is part of the world's definition, not of its seed: every world speaks the same A and
B, so task names and prompts mean the same thing across seeds.

Quantity verbs change how many objects someone has. The base model sees all of them in A
arithmetic stories, but in B stories only :data:`B_SEEN_VERBS`; the other ones
(:data:`B_HIDDEN_VERBS`) appear in B only in plain sentences, so their arithmetic meaning in B
is what the language-B specialist adds and what the cross task needs.
"""

from __future__ import annotations

import random
from typing import Iterable

NAMES: tuple[str, ...] = ("tom", "ann", "bob", "eve", "sam", "max", "lia", "ben", "kim", "joe",
                          "amy", "dan")
OBJECTS: tuple[str, ...] = ("apples", "pens", "cups", "books", "coins", "eggs", "stones",
                            "cards", "hats", "keys", "shells", "plums")
ADJECTIVES: tuple[str, ...] = ("red", "big", "small", "old", "new", "blue", "green", "soft")
PLACES: tuple[str, ...] = ("park", "house", "shop", "school", "garden", "river")
PLAIN_VERBS: tuple[str, ...] = ("sees", "likes", "wants", "paints", "holds", "washes", "hides",
                                "counts")
# Verb -> sign of its effect on the quantity (+1 adds, -1 removes).
QUANTITY_VERBS: dict[str, int] = {"buys": 1, "finds": 1, "gets": 1, "makes": 1,
                                  "eats": -1, "loses": -1, "sells": -1, "drops": -1}
B_SEEN_VERBS: tuple[str, ...] = ("buys", "eats")
B_HIDDEN_VERBS: tuple[str, ...] = tuple(v for v in QUANTITY_VERBS if v not in B_SEEN_VERBS)
FUNCTION_WORDS: tuple[str, ...] = ("the", "has", "now", "how", "many", "does", "have", "and",
                                   "in", "are", "question", "answer", "sort", "count", "largest")
PUNCTUATION: tuple[str, ...] = (".", "?", ":", "=", ",")
MAX_NUMBER = 99
NUMBERS: tuple[str, ...] = tuple(str(n) for n in range(MAX_NUMBER + 1))

A_WORDS: tuple[str, ...] = (NAMES + OBJECTS + ADJECTIVES + PLACES + PLAIN_VERBS
                            + tuple(QUANTITY_VERBS) + FUNCTION_WORDS)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_LEXICON_SEED = 20240517  # fixed: the language does not change with the world seed


def _invent_b_words(count: int, avoid: Iterable[str]) -> list[str]:
    rng = random.Random(_LEXICON_SEED)
    taken = set(avoid)
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        if rng.random() < 0.3:
            word += rng.choice(_CONSONANTS)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


A_TO_B: dict[str, str] = dict(zip(A_WORDS, _invent_b_words(len(A_WORDS), A_WORDS)))
B_TO_A: dict[str, str] = {b: a for a, b in A_TO_B.items()}
B_WORDS: tuple[str, ...] = tuple(A_TO_B[w] for w in A_WORDS)


def to_b(text: str) -> str:
    """Translate A text into B word by word; digits, punctuation and unknown words stay."""
    return " ".join(A_TO_B.get(word, word) for word in text.split())


def to_a(text: str) -> str:
    """Translate B text into A word by word (the inverse of :func:`to_b`)."""
    return " ".join(B_TO_A.get(word, word) for word in text.split())


def vocabulary() -> list[str]:
    """Every word of the world (A, B, numbers, punctuation) in a fixed order, specials excluded."""
    return list(A_WORDS) + list(B_WORDS) + list(NUMBERS) + list(PUNCTUATION)

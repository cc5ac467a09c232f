"""A world's held-out splits are held out from that world's own training text (issue 14, bug 1).

The training text of a world is every document its build draws (base pretraining and each
specialist's fine-tuning stream, read exactly as the build packs them); no prompt of a
``fitness``, ``validation`` or ``test`` split of the world's seed may occur in it. The other
seed's splits do occur in it, which is why every evaluation must read its world's own splits.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import pytest

from shoal.zoo.corpus import training_streams
from shoal.zoo.sizes import get_size
from shoal.zoo.tasks import ZOO_TASKS, get_zoo_task
from shoal.zoo.tokenizer import build_tokenizer
from shoal.zoo.train import pack

HELD_OUT = ("fitness", "validation", "test")
N = 4  # every zoo prompt has at least four words


def _recorded(stream: Iterator[tuple[str, str]], seen: list[str]) -> Iterator[tuple[str, str]]:
    for prompt, completion in stream:
        seen.append(f"{prompt} {completion}" if prompt else completion)
        yield prompt, completion


@lru_cache(maxsize=2)
def training_text(size: str, seed: int) -> tuple[str, ...]:
    """Every document the build of world (size, seed) draws from its streams."""
    spec = get_size(size)
    tokenizer = build_tokenizer()
    seen: list[str] = []
    for name, stream in training_streams(seed).items():
        settings = spec.base if name == "base" else spec.specialist
        pack(_recorded(stream, seen), tokenizer, settings.steps * settings.batch_size, settings.seq_len)
    return tuple(seen)


def occurrences(prompts: list[str], texts: tuple[str, ...]) -> list[str]:
    """The prompts that occur in some text (candidates by their first N words, then checked)."""
    by_ngram: dict[tuple[str, ...], list[int]] = {}
    for i, text in enumerate(texts):
        words = text.split()
        for start in range(len(words) - N + 1):
            by_ngram.setdefault(tuple(words[start:start + N]), []).append(i)
    found = []
    for prompt in prompts:
        candidates = by_ngram.get(tuple(prompt.split()[:N]), ())
        if any(prompt in texts[i] for i in candidates):
            found.append(prompt)
    return found


def held_out_prompts(seed: int) -> list[str]:
    return [ex.prompt for name in ZOO_TASKS for split in HELD_OUT
            for ex in get_zoo_task(name, seed).examples(split)]


@pytest.mark.parametrize("seed", [0, 1])
def test_no_held_out_prompt_occurs_in_the_worlds_training_text(seed: int) -> None:
    texts = training_text("micro", seed)
    assert len(texts) > 5000  # base and four specialists
    leaked = occurrences(held_out_prompts(seed), texts)
    assert not leaked, f"{len(leaked)} held-out prompts of seed {seed} are in its training text: {leaked[:3]}"


def test_another_seeds_splits_are_not_held_out_from_this_world() -> None:
    """The check above can fail: seed 0's held-out prompts do occur in the seed-1 world's
    training text (its specialists trained on seed 1's train split)."""
    assert occurrences(held_out_prompts(0), training_text("micro", 1))


def test_the_build_reads_the_streams_the_test_reads() -> None:
    """``training_streams`` is what ``build_zoo`` trains on (same documents, same order)."""
    import random

    from shoal.zoo.corpus import documents, pretraining_mix, specialist_mix

    streams = training_streams(3)
    reference = documents(specialist_mix("count", 3), random.Random("specialist:count:3"))
    assert [next(streams["count"]) for _ in range(50)] == [next(reference) for _ in range(50)]
    base = documents(pretraining_mix(), random.Random("pretrain:3"))
    assert [next(streams["base"]) for _ in range(50)] == [next(base) for _ in range(50)]

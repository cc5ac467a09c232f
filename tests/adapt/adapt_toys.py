"""Helpers for the Transformer² tests: a word-level tokenizer, toy tasks, model loading."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from shoal.eval.scoring import normalize_words
from shoal.eval.task import SPLITS, Example

LETTERS = list("cdefghij")
WORDS = ["<pad>", "<s>", "</s>", "<unk>", "a", "b", *LETTERS, "ay", "bee", "cee", "other", ":", "=", "."]


def build_word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


@dataclass(frozen=True)
class ToyTask:
    """``<marker> : x y z =`` -> ``answer``; ``answer="first"`` copies the first letter."""

    name: str
    marker: str
    answer: str
    kind: Literal["generate", "choice"] = "generate"
    max_new_tokens: int = 2
    sizes: tuple[int, ...] = (64, 16, 16, 16)

    def examples(self, split: str) -> Sequence[Example]:
        rng = random.Random(f"{self.name}:{split}")
        out = []
        for _ in range(dict(zip(SPLITS, self.sizes))[split]):
            letters = rng.sample(LETTERS, 3)
            target = letters[0] if self.answer == "first" else self.answer
            out.append(Example(f"{self.marker} : {' '.join(letters)} =", target, completion=f"{target} ."))
        return out

    def score(self, output: str, example: Example) -> float:
        words = normalize_words(output).split()
        return float(bool(words) and words[0] == example.target)


def load(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()

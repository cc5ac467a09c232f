"""The zoo tokenizer and the two languages."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from shoal.zoo.languages import A_TO_B, A_WORDS, B_WORDS, NUMBERS, to_a, to_b
from shoal.zoo.tasks import ZOO_TASKS, get_zoo_task
from shoal.zoo.tokenizer import build_tokenizer


def test_languages_are_a_bijection_with_disjoint_words() -> None:
    assert len(set(A_TO_B.values())) == len(A_WORDS) == len(B_WORDS)
    assert not set(B_WORDS) & (set(A_WORDS) | set(NUMBERS))
    text = "tom has 3 apples . question : how many apples does tom have ? answer :"
    assert to_b(text) != text
    assert to_a(to_b(text)) == text
    assert to_b(text).split()[2] == "3"


def test_task_prompts_round_trip_without_unknown_words(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for name in ZOO_TASKS:
        for example in get_zoo_task(name).examples("test")[:100]:
            text = f"{example.prompt} {example.reference}"
            ids = loaded(text)["input_ids"]
            assert ids[0] == loaded.bos_token_id
            assert len(ids) == len(text.split()) + 1  # one token per word
            assert loaded.unk_token_id not in ids
            assert ids == tokenizer(text)["input_ids"]
            assert loaded.decode(ids, skip_special_tokens=True) == text


def test_unknown_words_and_special_tokens() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("tom zebra 7 .")["input_ids"]
    assert ids[2] == tokenizer.unk_token_id
    assert tokenizer.decode(ids[1:]) == "tom <unk> 7 ."
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
                tokenizer.unk_token_id}) == 4
    batch = tokenizer(["tom", "tom has 3"], padding=True)
    assert batch["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2  # left padding

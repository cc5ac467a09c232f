"""Fixtures for the layer-path tests: tiny Llama sources over a word vocabulary, built locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = ("<pad> <s> </s> <unk> zero one two three four five six seven eight nine ten plus minus "
         "is what answer the a cat dog red blue green yes no . ? ; : - = end stop").split()


def make_word_tokenizer():
    """A whitespace word-level tokenizer over ``WORDS`` (bos ``<s>``, eos ``</s>``, pad ``<pad>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def save_word_llama(out: Path, seed: int, layers: int = 3) -> Path:
    """A random Llama over the word vocabulary with its tokenizer; a large init makes greedy
    outputs vary from prompt to prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    make_word_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def word_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 3-layer word-vocabulary Llamas (``a``, ``b``) saved with a tokenizer."""
    root = tmp_path_factory.mktemp("flow_sources")
    return save_word_llama(root / "a", seed=11), save_word_llama(root / "b", seed=12)


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer()


PROMPTS = ["what is two plus two ?", "cat", "red blue green yes no . the a", "one"]

"""The zoo's word-level tokenizer, in the Hugging Face ``tokenizers`` format.

One token per word of A or B, per number 0..99 and per punctuation mark; words are split on
whitespace; anything else becomes ``<unk>``. Encoding adds ``<s>`` in front; decoding joins
tokens with spaces.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from shoal.zoo.languages import vocabulary

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer of the world: ids 0-3 are pad, bos, eos, unk; then :func:`vocabulary`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = SPECIAL_TOKENS + tuple(vocabulary())
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("the zoo vocabulary lists a word twice")
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, padding_side="left",
                                   clean_up_tokenization_spaces=False)

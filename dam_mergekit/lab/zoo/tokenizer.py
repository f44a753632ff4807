"""An offline word-level tokenizer for the LLM zoo, and prompt/answer batching.

The tokenizer is built with the ``tokenizers`` library (no download) and wrapped in
``PreTrainedTokenizerFast`` so it is saved beside every model and mergekit copies it. Being
word-level over whitespace, ``tokens(prompt + " " + answer) == tokens(prompt) + tokens(answer)``,
so the position where an answer starts is exact.

Batching and answer scoring (``encode_prompts``, ``answer_token_logprobs``, ...) live in
:mod:`dam_mergekit.scoring.causal_lm`, shared with calibration, and are importable from here.
"""

from __future__ import annotations

from collections.abc import Sequence

from dam_mergekit.scoring.causal_lm import (  # noqa: F401  (public names of this module)
    PromptBatch,
    answer_first_token_ids,
    answer_token_logprobs,
    collate,
    encode_ids,
    encode_prompts,
    logits_at_answer,
)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def build_word_tokenizer(words: Sequence[str]):
    """A ``PreTrainedTokenizerFast`` over ``words`` (+ specials) that prepends ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, UNK, BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )

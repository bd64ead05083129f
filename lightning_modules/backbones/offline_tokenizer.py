"""A small byte-level BPE tokenizer built offline, for tiny test and demo backbones."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Words the demo captions and the shipped prompts use, so tiny models see short token sequences.
DEFAULT_CORPUS = (
    "You are a helpful assistant. Summarize above audio in one word: Summarize above sentence in one "
    "word: Summarize above audio and sentence in one word: query: passage: Represent the user's input. "
    "Based on the question asked in the text query and context in the audio query, retrieve the "
    "relevant text document associated with that question. a an the one two three single double triple "
    "low high hum tone beep beeps rising falling chirp chirps noise burst bursts click clicks siren "
    "sirens buzz buzzes knock knocks chord chords whistle whistles short long loud quiet soft then "
    "followed by after before and with sound sounds of repeated times once twice thrice is are there "
    "first second third event events audio clip recording hear heard pitched pitch sweep sweeping up "
    "down static hiss sharp wailing electric buzzing knocking musical what which how many question "
    "answer yes no choices"
)


def build_offline_tokenizer(
    special_tokens: list[str],
    corpus: Iterable[str] = (DEFAULT_CORPUS,),
    vocab_size: int = 512,
    pad_token: str | None = None,
    eos_token: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``corpus``; ``special_tokens`` get ids 0, 1, 2, ... in order.

    Byte-level BPE can encode any string, so unseen words cost more tokens but never fail.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad_token,
        eos_token=eos_token,
        additional_special_tokens=[t for t in special_tokens if t not in (pad_token, eos_token)],
    )

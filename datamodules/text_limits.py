"""Token limits on what one input brings to a prompt.

A single over-long caption (a scraped description, a whole transcript pasted into a field) turns a
batch's prompts into tens of thousands of tokens, and the attention over them needs more memory
than any machine has: the run dies hours in, on a CPU killed by the kernel, on a GPU with a CUDA
out-of-memory error. Two limits keep every prompt bounded, as AuroLA does (arXiv 2602.18010:
captions truncated to 480 tokens, prompts to 1024):

- ``max_text_tokens``: every text an input carries (a caption, a question with its choices, an
  answer, an instruction, a hard-negative query) is cut to its first ``max_text_tokens`` tokens
  before the prompt is built. The cut falls on a token boundary of the original string, so the
  truncated text is a prefix of it; the backbone collators count the inputs they cut, and the
  counts are logged like skipped samples (``data/truncated/<split>/...``).
- ``max_prompt_tokens``: the whole prompt (template, texts, audio placeholders) must fit, or the
  collator raises :class:`PromptTooLongError` before anything is run; the pair collator adds the
  row (``manifest:line``) and the clip id to the message. With the texts truncated, only long
  audio can get there: crop it (``train_max_seconds`` / ``eval_max_seconds``) or raise the limit.

``None`` turns either limit off. ``python main.py check-data`` lists the texts over
``max_text_tokens`` as warnings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datamodules.inputs import EmbedInput

__all__ = [
    "DEFAULT_MAX_PROMPT_TOKENS",
    "DEFAULT_MAX_TEXT_TOKENS",
    "PromptTooLongError",
    "check_limits",
    "check_prompt_lengths",
    "text_token_counts",
    "truncate_inputs",
    "truncate_text",
]

#: AuroLA's caption length (tokens).
DEFAULT_MAX_TEXT_TOKENS = 480
#: AuroLA's maximum prompt length (tokens).
DEFAULT_MAX_PROMPT_TOKENS = 1024


class PromptTooLongError(ValueError):
    """A prompt longer than ``max_prompt_tokens``.

    Attributes:
        index: position of the input in the list the collator was given.
        tokens: the prompt's length in tokens.
        limit: ``max_prompt_tokens``.
    """

    def __init__(self, message: str, index: int, tokens: int, limit: int):
        super().__init__(message)
        self.index = index
        self.tokens = tokens
        self.limit = limit


def check_limits(max_text_tokens: int | None, max_prompt_tokens: int | None) -> None:
    """Both limits are ``None`` or positive."""
    for name, value in (("max_text_tokens", max_text_tokens), ("max_prompt_tokens", max_prompt_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or null (no limit), got {value}")


def text_token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text on its own (no special tokens), with the backbone's tokenizer."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def truncate_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` ending on one of its token boundaries that has at most
    ``max_tokens`` tokens (``text`` itself when it is short enough).

    The prefix is cut from the original string at the end of its ``max_tokens``-th token (character
    offsets of a fast tokenizer), so nothing is decoded back; byte-level tokens that split one
    character share its offsets, and a prefix can merge differently from the whole, so the cut is
    re-checked until it fits.
    """
    end = len(text)
    while True:
        offsets = tokenizer(text[:end], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) <= max_tokens:
            return text[:end]
        end = min(offsets[max_tokens - 1][1], end - 1)


def truncate_inputs(
    tokenizer: Any, items: Sequence[EmbedInput], max_tokens: int | None
) -> tuple[list[EmbedInput], int]:
    """``items`` with every text and instruction cut to ``max_tokens`` tokens (:func:`truncate_text`),
    and how many items had something cut. The items given are not changed; ``None``: no limit."""
    items = list(items)
    if max_tokens is None:
        return items, 0
    fields = [(i, name) for i, item in enumerate(items) for name in ("text", "instruction") if getattr(item, name)]
    counts = text_token_counts(tokenizer, [getattr(items[i], name) for i, name in fields])
    cut: dict[int, dict[str, str]] = {}
    for (i, name), count in zip(fields, counts):
        if count > max_tokens:
            cut.setdefault(i, {})[name] = truncate_text(tokenizer, getattr(items[i], name), max_tokens)
    for i, changes in cut.items():
        items[i] = replace(items[i], **changes)
    return items, len(cut)


def check_prompt_lengths(lengths: Sequence[int], max_prompt_tokens: int | None) -> None:
    """Raise :class:`PromptTooLongError` for the first prompt longer than ``max_prompt_tokens``."""
    if max_prompt_tokens is None:
        return
    for index, tokens in enumerate(lengths):
        if tokens > max_prompt_tokens:
            raise PromptTooLongError(
                f"prompt of {tokens} tokens exceeds max_prompt_tokens={max_prompt_tokens}: shorten the row's audio "
                "(the data module's train_max_seconds / eval_max_seconds crop it) or texts (the backbone's "
                "max_text_tokens cuts them), or raise the backbone's max_prompt_tokens",
                index,
                tokens,
                max_prompt_tokens,
            )

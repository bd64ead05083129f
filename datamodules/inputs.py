"""What one side of a retrieval pair looks like before the backbone's collator sees it.

Shared by the data and the model side, so it lives with the data (imports run model → data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


#: where an input's audio goes inside its text, for prompts that put text before the audio (the
#: re-ranker's "Query: ... Candidate: <audio>"); without it, a backbone puts the audio first.
AUDIO_SLOT = "<audio>"


@dataclass
class EmbedInput:
    """One thing to embed: text, audio, or both, with an optional instruction.

    ``audio`` is a mono float32 waveform already at the backbone's sampling rate (the datamodule
    decodes and resamples). Which prompt template a backbone uses follows from which fields are set.
    """

    text: str | None = None
    audio: np.ndarray | None = None
    instruction: str | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.audio is None:
            raise ValueError("EmbedInput needs text, audio or both")
        if self.audio is not None and (self.audio.ndim != 1 or self.audio.dtype != np.float32):
            raise ValueError(
                f"EmbedInput.audio must be a 1-D float32 waveform, got shape {self.audio.shape} "
                f"dtype {self.audio.dtype}"
            )

    @property
    def modality(self) -> str:
        """``"audio"``, ``"text"`` or ``"audio_text"``."""
        if self.audio is not None and self.text is not None:
            return "audio_text"
        return "audio" if self.audio is not None else "text"


#: A backbone's input builder: a picklable callable from a list of inputs to model tensors (it runs
#: in data-loader workers).
Collator = Callable[[list[EmbedInput]], dict[str, torch.Tensor]]

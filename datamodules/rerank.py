"""Data for the re-ranker (AuroLA-rerank): (query, candidate) prompts with mined hard negatives.

A re-ranker reads a query and one candidate together and answers "Yes" or "No" (see
:class:`lightning_modules.RerankModule`). Training items are the usual training pairs of
:class:`~datamodules.datasets.PairDataset` (a clip and one caption) plus, per item, a direction and
``num_negatives`` hard negatives drawn from the mined neighbours of the clip
(:mod:`datamodules.hard_negatives`, written by ``python main.py mine``):

- audio → text (A2T): query = the clip's audio, candidates = its caption, then captions of the
  clip's nearest other clips (text neighbours);
- text → audio (T2A): query = the caption, candidates = the clip's audio, then the audio of its
  nearest other clips (audio neighbours, decoded and cropped like the clip itself).

Every random choice (direction, which neighbours, their crops) is a function of ``(seed, epoch,
index)``, like the base dataset's, so resumed runs and worker processes draw the same items. A clip
without mined neighbours on the side it needs is an error naming it; nothing is ever replaced by
random negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.bad_samples import SkippedSample, count_reasons
from datamodules.datasets import PairDataset, _load
from datamodules.inputs import AUDIO_SLOT, Collator, EmbedInput

if TYPE_CHECKING:
    from datamodules.hard_negatives import MinedNegatives

Direction = Literal["a2t", "t2a"]
DIRECTIONS: tuple[Direction, ...] = ("a2t", "t2a")


@dataclass
class RerankPrompts:
    """AuroLA-rerank's prompt: one user turn with an instruction, the query and the candidate; the
    model answers ``yes`` or ``no``. ``{caption}`` is the caption; the audio goes where the backbone's
    audio markup belongs (right after "Query:" for A2T, after "Candidate:" for T2A).

    Args:
        instruction: the task statement opening the user turn.
        a2t_query: text after the query audio (audio → text).
        t2a_query: the query of text → audio; ``{caption}`` is the query caption.
        query_label: label before the query.
        candidate_label: label before the candidate.
        yes: the positive answer token.
        no: the negative answer token.
    """

    instruction: str = (
        "I will provide you with a query and a candidate. Please evaluate whether the candidate matches the "
        "query. If it does, respond with 'Yes'; if it doesn't, respond with 'No'."
    )
    a2t_query: str = "Find a caption describing the sound events in the given audio."
    t2a_query: str = "Find an audio containing the sound events in the following caption: {caption}"
    query_label: str = "Query:"
    candidate_label: str = "Candidate:"
    yes: str = "Yes"
    no: str = "No"

    def pair(self, direction: Direction, audio: np.ndarray, caption: str) -> EmbedInput:
        """The prompt of one (query, candidate) pair as one input (the audio at its slot)."""
        if direction == "a2t":
            query, candidate = f"{AUDIO_SLOT}{self.a2t_query}", caption
        else:
            query, candidate = self.t2a_query.format(caption=caption), AUDIO_SLOT
        text = f"{self.instruction}\n{self.query_label}\n{query}\n{self.candidate_label}\n{candidate}"
        return EmbedInput(text=text, audio=audio)


class RerankPairDataset(Dataset):
    """Training groups for the re-ranker over a :class:`PairDataset`: each item is the base item plus
    ``direction`` and its ``negatives`` (caption texts for A2T, waveforms for T2A).

    Args:
        base: the training pairs (one clip, one sampled caption).
        mined: the clips' mined neighbours, by clip id (:func:`datamodules.hard_negatives.read_mined`).
        num_negatives: hard negatives per query.
        directions: ``"both"`` draws A2T or T2A with probability 1/2 per item (AuroLA), or one of them.
    """

    def __init__(
        self,
        base: PairDataset,
        mined: dict[str, MinedNegatives],
        num_negatives: int,
        directions: Literal["both", "a2t", "t2a"] = "both",
    ):
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if directions not in ("both", *DIRECTIONS):
            raise ValueError(f"directions must be 'both', 'a2t' or 't2a', got {directions!r}")
        self.base = base
        self.num_negatives = num_negatives
        self.directions = DIRECTIONS if directions == "both" else (directions,)
        self.by_id = {record.id: i for i, record in enumerate(base.records)}
        self.mined = mined
        if num_negatives:
            for record in base.records:
                found = mined.get(record.id)
                for direction in self.directions:
                    side = [] if found is None else found.text if direction == "a2t" else found.audio
                    if not side:
                        raise ValueError(
                            f"clip '{record.id}' ({record.source}) has no mined {'text' if direction == 'a2t' else 'audio'} "
                            f"negatives for {direction}; mine with a lower threshold or drop the clip"
                        )

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | SkippedSample:
        item = self.base[key]
        if isinstance(item, SkippedSample):
            return item
        epoch, index = key if isinstance(key, tuple) else (self.base.epoch, key)
        rng = np.random.default_rng([self.base.seed, epoch, index, 1])  # 1: the re-ranker's own stream
        direction = self.directions[int(rng.integers(len(self.directions)))]
        item["direction"] = direction
        if not self.num_negatives:
            item["negatives"] = []
            return item
        mined = self.mined[item["clip_id"]]
        side = mined.text if direction == "a2t" else mined.audio
        # The top neighbours first, as AuroLA ranks them; with fewer than asked, some repeat.
        picks = rng.permutation(len(side))[: self.num_negatives]
        picks = np.resize(picks, self.num_negatives)
        if direction == "a2t":
            item["negatives"] = [side[i][1] for i in picks]
            return item
        negatives = []
        for i in picks:
            record = self.base.records[self.by_id[side[i][0]]]
            wave = _load(record, self.base.sampling_rate, self.base.policy, self.base.on_bad_sample,
                         self.base.train, rng)
            if isinstance(wave, SkippedSample):
                return wave
            negatives.append(wave)
        item["negatives"] = negatives
        return item


class RerankCollator:
    """Turns re-ranker items into a batch (picklable, runs in data-loader workers).

    Training items (with ``direction``) become groups of ``1 + num_negatives`` prompts, the positive
    first: ``{"inputs": backbone tensors, "group_size": int, "directions": [...], "clip_ids": [...],
    "skipped": {...}}``. Evaluation items (a clip with all its captions) pass through as
    ``{"clips": [{"clip_id", "audio", "captions"}], "skipped": {...}}``: the re-ranker builds its
    evaluation pairs once it knows every clip's top candidates.

    Args:
        backbone_collator: the backbone's input builder with a generation prompt.
        prompts: the re-ranking prompt.
    """

    def __init__(self, backbone_collator: Collator, prompts: RerankPrompts):
        self.backbone_collator = backbone_collator
        self.prompts = prompts

    def pairs(self, item: dict[str, Any]) -> list[EmbedInput]:
        """The positive then the negative prompts of one training item."""
        audio, caption = item["query"].audio, item["documents"][0].text
        if item["direction"] == "a2t":
            return [self.prompts.pair("a2t", audio, text) for text in [caption, *item["negatives"]]]
        return [self.prompts.pair("t2a", wave, caption) for wave in [audio, *item["negatives"]]]

    def __call__(self, examples: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        skipped = dict(count_reasons(ex for ex in examples if isinstance(ex, SkippedSample)))
        examples = [ex for ex in examples if not isinstance(ex, SkippedSample)]
        if not examples:
            return {"empty": True, "skipped": skipped}
        if "direction" not in examples[0]:
            clips = [{"clip_id": ex["clip_id"], "clip_index": ex["clip_index"], "audio": ex["query"].audio,
                      "captions": [doc.text for doc in ex["documents"]]} for ex in examples]
            return {"clips": clips, "skipped": skipped}
        groups = [self.pairs(ex) for ex in examples]
        return {
            "inputs": self.backbone_collator([pair for group in groups for pair in group]),
            "group_size": len(groups[0]),
            "directions": [ex["direction"] for ex in examples],
            "clip_ids": [ex["clip_id"] for ex in examples],
            "query_index": torch.tensor([ex["clip_index"] for ex in examples]),
            "skipped": skipped,
        }

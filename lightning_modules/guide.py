"""Frozen text scorers that guide false-negative masking (GISTEmbed-style)."""

from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn


class TextGuide(nn.Module):
    """A frozen scorer of text pairs, outside the model being trained.

    The audio side has no text, so the guide compares each query's paired caption with every
    candidate caption: ``guide_ij = sim(caption_i, caption_j)``. With
    :class:`losses.GuideModelMasker` a candidate is dropped as a false negative when it scores
    within ``margin`` of the true pair (a near-paraphrase of the anchor's own caption).

    References:
        Solatorio, "GISTEmbed: Guided In-sample Selection of Training Negatives for Text
        Embedding Fine-tuning", 2024.
    """

    def forward(self, texts: list[str]) -> torch.Tensor:
        """``(B, B)`` cosine similarities between ``texts``."""
        emb = self.embed(texts)
        return emb @ emb.T

    def embed(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class BagOfWordsGuide(TextGuide):
    """Cosine similarity of word-count vectors: a cheap, deterministic guide needing no weights."""

    def embed(self, texts: list[str]) -> torch.Tensor:
        counts = [Counter(re.findall(r"[a-z0-9']+", t.lower())) for t in texts]
        vocab = {w: i for i, w in enumerate(sorted(set().union(*counts)))}
        out = torch.zeros(len(texts), max(1, len(vocab)))
        for row, c in enumerate(counts):
            for word, n in c.items():
                out[row, vocab[word]] = float(n)
        return F.normalize(out, dim=-1)


class PretrainedTextGuide(TextGuide):
    """Mean-pooled last hidden states of a frozen pretrained text encoder (e.g. a sentence
    embedding model), loaded with ``transformers.AutoModel.from_pretrained``.

    Args:
        name_or_path: hub id or local directory of the encoder.
        max_length: truncate texts to this many tokens.
    """

    def __init__(self, name_or_path: str, max_length: int = 128):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.encoder = AutoModel.from_pretrained(name_or_path).eval().requires_grad_(False)
        self.max_length = max_length

    def train(self, mode: bool = True) -> PretrainedTextGuide:
        return super().train(False)  # the guide never trains, dropout stays off

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        hidden = self.encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize(((hidden * mask).sum(1) / mask.sum(1)).float(), dim=-1)

"""Poolers: one vector per sequence from the backbone's last hidden states."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.backbones.base import BackboneOutput
from lightning_modules.init_args import RecordsInitArgs


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row; works for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).amax(dim=1)


class Pooler(RecordsInitArgs, nn.Module):
    """Maps :class:`BackboneOutput` to ``(B, H)`` embeddings (before the head)."""

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        raise NotImplementedError


class EmbTokenPooler(Pooler):
    """State at the position just before the ``<emb>`` marker token (AuroLA).

    Under causal attention this is the last state that has not seen the marker, the "one word"
    the prompt asks for. Every row must contain the marker; the first occurrence is used.

    References:
        AuroLA, arXiv 2602.18010.
    """

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        if out.emb_token_id is None:
            raise ValueError("EmbTokenPooler needs a backbone with an <emb> marker token")
        is_marker = (out.input_ids == out.emb_token_id) & out.attention_mask.bool()
        first = is_marker.int().argmax(dim=1)  # 0 also when a row has no marker
        # One read-back for both checks: where the marker is, is known on the device only.
        if bool((first == 0).any()):
            missing = (~is_marker.any(dim=1)).nonzero().flatten().tolist()
            if missing:
                raise ValueError(f"rows {missing} contain no <emb> token (id {out.emb_token_id})")
            raise ValueError("<emb> is the first token of a row: there is no state before it")
        rows = torch.arange(first.shape[0], device=first.device)
        return out.hidden_states[rows, first - 1]


class LastTokenPooler(Pooler):
    """State of the last non-pad token (the final EOS in ALM2Vec); left or right padding."""

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        index = last_real_index(out.attention_mask)
        rows = torch.arange(index.shape[0], device=index.device)
        return out.hidden_states[rows, index]


class MeanPooler(Pooler):
    """Mean of the states of the non-pad tokens (Omni-Embed-Audio)."""

    def forward(self, out: BackboneOutput) -> torch.Tensor:
        mask = out.attention_mask.to(out.hidden_states.dtype).unsqueeze(-1)
        return (out.hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

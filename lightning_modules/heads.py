"""Projection heads between the pooled state and the embedding space."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_modules.init_args import RecordsInitArgs


class Head(RecordsInitArgs, nn.Module):
    """A projection whose input width is given by the backbone at :meth:`build` time.

    Heads are built lazily so that configs name only the output size; ``modality`` (``"audio"``,
    ``"text"`` or ``"audio_text"``) lets modality-specific heads route each side.
    """

    out_features: int | None = None

    def build(self, in_features: int) -> None:
        """Create the layers for input width ``in_features``."""

    def forward(self, x: Tensor, modality: str) -> Tensor:
        raise NotImplementedError

    def output_size(self, in_features: int) -> int:
        return self.out_features or in_features


class IdentityHead(Head):
    """No projection: the pooled state is the embedding (AuroLA)."""

    def forward(self, x: Tensor, modality: str) -> Tensor:
        return x


class LinearHead(Head):
    """One linear projection shared by all modalities (ALM2Vec).

    Args:
        out_features: embedding size.
        bias: add a bias.
    """

    def __init__(self, out_features: int, bias: bool = True):
        super().__init__()
        self.out_features = out_features
        self.bias = bias

    def build(self, in_features: int) -> None:
        self.proj = nn.Linear(in_features, self.out_features, bias=self.bias)

    def forward(self, x: Tensor, modality: str) -> Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


class MLPHead(Head):
    """Two-layer MLP projection shared by all modalities.

    Args:
        out_features: embedding size.
        hidden_features: width of the hidden layer (defaults to the input width).
        dropout: dropout after the activation.
    """

    def __init__(self, out_features: int, hidden_features: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.out_features = out_features
        self.hidden_features = hidden_features
        self.dropout = dropout

    def build(self, in_features: int) -> None:
        hidden = self.hidden_features or in_features
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(hidden, self.out_features)
        )

    def forward(self, x: Tensor, modality: str) -> Tensor:
        return self.mlp(x.to(self.mlp[0].weight.dtype))


class ModalityHeads(Head):
    """Separate linear projections for audio-bearing and text-only inputs (Omni-Embed-Audio).

    Inputs with audio (``audio`` and ``audio_text``) go through the audio projection, text-only
    inputs through the text projection, into one shared space.

    References:
        Omni-Embed-Audio, arXiv 2604.18360.

    Args:
        out_features: size of the shared embedding space (512 in Omni-Embed-Audio).
        bias: add a bias.
    """

    def __init__(self, out_features: int = 512, bias: bool = True):
        super().__init__()
        self.out_features = out_features
        self.bias = bias

    def build(self, in_features: int) -> None:
        self.audio = nn.Linear(in_features, self.out_features, bias=self.bias)
        self.text = nn.Linear(in_features, self.out_features, bias=self.bias)

    def forward(self, x: Tensor, modality: str) -> Tensor:
        proj = self.text if modality == "text" else self.audio
        return proj(x.to(proj.weight.dtype))

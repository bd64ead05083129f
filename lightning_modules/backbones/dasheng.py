"""The Dasheng audio encoder as used inside MiDashengLM, with its log-mel front end.

Dasheng (Dinkel et al., "Scaling up masked audio encoder learning for general audio
classification", Interspeech 2024) is a ViT over log-mel spectrograms. MiDashengLM (Dinkel et al.,
arXiv 2508.03983) uses the 0.6B variant as its audio encoder. Parameter names follow the published
MiDashengLM checkpoint (``audio_encoder.blocks.N.attn.qkv`` ...), so a state dict loads unchanged.

Front end, as in the official modeling code: 16 kHz, periodic Hann window of 512 samples, n_fft 512,
hop 160, centred frames with reflect padding, power spectrum, 64-band HTK mel filterbank from 0 to
8 kHz without area normalisation, ``10 * log10(max(x, 1e-10))`` and a per-clip floor 120 dB below the
clip's maximum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: smallest power kept before the log, and the dynamic range kept per clip (official values).
_AMIN = 1e-10
_TOP_DB = 120.0


def _pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


@dataclass
class DashengConfig:
    """Hyper-parameters of the Dasheng encoder, named as in MiDashengLM's ``audio_encoder_config``.

    ``patch_size`` / ``patch_stride`` are (frequency, time) in mel bins and frames. Published
    MiDashengLM checkpoints use (64, 4): one patch spans all mel bins and 4 frames (40 ms), so the
    token sequence is a plain time sequence and the attention mask is a time mask.
    ``target_length`` is the chunk length in frames: longer inputs are encoded chunk by chunk.
    The defaults are the published checkpoints' values (Dasheng-base widths, (64, 4) patches, 1008
    frames per chunk), so ``DashengConfig()`` and ``from_dict({})`` build a valid encoder config.
    ``outputdim``, ``drop_rate`` and ``attn_drop_rate`` are kept for config round trips only (the
    classification head is not part of MiDashengLM and dropout is 0).
    """

    embed_dim: int = 768
    outputdim: int = 527
    patch_size: list[int] = field(default_factory=lambda: [64, 4])
    patch_stride: list[int] = field(default_factory=lambda: [64, 4])
    input_channels: int = 1
    target_length: int = 1008
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    f_min: float = 0.0
    f_max: float = 8000.0
    center: bool = True
    win_length: int = 512
    hop_length: int = 160
    sample_rate: int = 16000
    n_fft: int = 512
    n_mels: int = 64

    def __post_init__(self) -> None:
        self.patch_size = list(_pair(self.patch_size))
        self.patch_stride = list(_pair(self.patch_stride))
        if self.patch_size[0] != self.n_mels or self.patch_stride[0] != self.n_mels:
            # The official length mask is a time mask; it is only right when a patch covers every
            # mel bin, which is the case for all published MiDashengLM checkpoints.
            raise ValueError(
                f"MiDashengLM's encoder needs patches spanning all {self.n_mels} mel bins, got "
                f"patch_size={self.patch_size}, patch_stride={self.patch_stride}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DashengConfig:
        """Build from a ``config.json`` sub-dict, ignoring bookkeeping keys such as ``model_type``."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def frames_per_patch(self) -> int:
        """Frames between consecutive encoder tokens (the time stride of the patch embedding)."""
        return self.patch_stride[1]

    @property
    def patches_per_chunk(self) -> int:
        return self.target_length // self.frames_per_patch


def num_mel_frames(num_samples: int | torch.Tensor, config: DashengConfig) -> int | torch.Tensor:
    """Frames the STFT yields for ``num_samples`` samples (an int, or a tensor of lengths)."""
    if config.center:
        return 1 + num_samples // config.hop_length
    return 1 + (num_samples - config.n_fft) // config.hop_length


def num_encoder_patches(num_samples: int | torch.Tensor, config: DashengConfig) -> int | torch.Tensor:
    """Tokens the patch embedding yields for a clip (a strided convolution over frames); an int,
    or elementwise for a tensor of lengths."""
    patches = (num_mel_frames(num_samples, config) - config.patch_size[1]) // config.frames_per_patch + 1
    return patches.clamp(min=0) if isinstance(patches, torch.Tensor) else max(0, patches)


def hz_to_mel_htk(freq: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + freq / 700.0)


def mel_to_hz_htk(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def htk_mel_filterbank(
    n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int
) -> torch.Tensor:
    """Triangular filters equally spaced on the HTK mel scale, unnormalised: ``(n_freqs, n_mels)``."""
    bin_freqs = torch.linspace(0.0, sample_rate // 2, n_freqs, dtype=torch.float64)
    mel_edges = torch.linspace(
        hz_to_mel_htk(torch.tensor(f_min, dtype=torch.float64)).item(),
        hz_to_mel_htk(torch.tensor(f_max, dtype=torch.float64)).item(),
        n_mels + 2,
        dtype=torch.float64,
    )
    hz_edges = mel_to_hz_htk(mel_edges)
    widths = hz_edges[1:] - hz_edges[:-1]
    offsets = hz_edges[None, :] - bin_freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


class LogMelFrontEnd(nn.Module):
    """Waveform → log-mel spectrogram in dB, computed in float32 whatever the model dtype, and
    with autocast off.

    The window and filterbank are rebuilt on each call (a few microseconds) instead of being
    buffers, so casting the model to bfloat16 or building it on the meta device cannot touch them.

    Args:
        config: the encoder config; only its front-end fields are read.
    """

    def __init__(self, config: DashengConfig) -> None:
        super().__init__()
        self.n_fft = config.n_fft
        self.win_length = config.win_length
        self.hop_length = config.hop_length
        self.center = config.center
        self.n_mels = config.n_mels
        self.f_min = config.f_min
        self.f_max = config.f_max
        self.sample_rate = config.sample_rate

    def filterbank(self, device: torch.device | None = None) -> torch.Tensor:
        bank = htk_mel_filterbank(self.n_fft // 2 + 1, self.f_min, self.f_max, self.n_mels, self.sample_rate)
        return bank.to(device=device, dtype=torch.float32)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, samples)`` → ``(B, n_mels, frames)`` in dB, the 120 dB floor set per clip.

        With ``lengths`` (samples, each above ``n_fft // 2``) every clip is transformed as if it
        were alone: its centring reflects its own last samples rather than the batch's padding, its
        floor comes from its own frames, and its frames past its end are zero (they fall in masked
        tokens only). This is done for the whole batch at once, without reading the lengths on the
        host.
        """
        # Under bf16-mixed the caller runs inside autocast, which would do the filterbank product
        # in bfloat16 (about 3 significant digits on powers spanning 120 dB).
        with torch.autocast(waveform.device.type, enabled=False):
            return self._log_mel(waveform.to(torch.float32), lengths)

    def _log_mel(self, waveform: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if lengths is None:
            framed, center = waveform, self.center
        else:
            lengths = lengths.to(waveform.device)
            framed, center = (self._reflect_each_clip(waveform, lengths) if self.center else waveform), False
        window = torch.hann_window(self.win_length, periodic=True, device=waveform.device)
        spectrum = torch.stft(
            framed,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=window,
            center=center,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        power = spectrum.real.square() + spectrum.imag.square()  # (B, n_freqs, frames)
        mel = torch.einsum("bft,fm->bmt", power, self.filterbank(waveform.device))
        db = 10.0 * torch.log10(torch.clamp(mel, min=_AMIN))
        if lengths is None:
            return torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - _TOP_DB)
        frames = 1 + lengths // self.hop_length if self.center else 1 + (lengths - self.n_fft) // self.hop_length
        valid = (torch.arange(db.shape[-1], device=db.device)[None, :] < frames[:, None]).unsqueeze(1)
        floor = db.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True) - _TOP_DB
        return torch.where(valid, torch.maximum(db, floor), 0.0)

    def _reflect_each_clip(self, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``n_fft // 2`` reflected samples before each clip and after its own last sample (as
        ``torch.stft(center=True)`` pads a lone clip); further positions only reach frames past
        the clip's end."""
        pad = self.n_fft // 2
        width = waveform.shape[-1]
        positions = torch.arange(-pad, width + pad, device=waveform.device).abs()[None, :]
        last = lengths[:, None] - 1
        source = torch.where(positions > last, 2 * last - positions, positions)
        return waveform.gather(1, source.clamp(0, width - 1))


class PatchEmbed(nn.Module):
    """Strided convolution turning ``(B, 1, mels, frames)`` into ``(B, D, 1, patches)``.

    Args:
        config: the encoder config (patch size and stride, width, input channels).
    """

    def __init__(self, config: DashengConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            config.input_channels,
            config.embed_dim,
            kernel_size=tuple(config.patch_size),
            stride=tuple(config.patch_stride),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class LayerScale(nn.Module):
    """Per-channel residual scaling (used only when ``init_values`` is set).

    Args:
        dim: channels.
        init_values: initial scale.
    """

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DashengAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused ``qkv`` projection.

    Args:
        dim: model width.
        num_heads: attention heads.
        qkv_bias: whether the ``qkv`` projection has a bias.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DashengMlp(nn.Module):
    """Two-layer GELU MLP.

    Args:
        dim: model width.
        hidden: inner width.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DashengBlock(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6, GELU MLP, optional LayerScale).

    Args:
        config: the encoder config.
    """

    def __init__(self, config: DashengConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DashengAttention(dim, config.num_heads, config.qkv_bias)
        self.ls1 = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DashengMlp(dim, int(dim * config.mlp_ratio))
        self.ls2 = LayerScale(dim, config.init_values) if config.init_values else nn.Identity()

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), key_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DashengEncoder(nn.Module):
    """Dasheng audio transformer (Dinkel et al., 2024) as configured in MiDashengLM (arXiv 2508.03983).

    Waveforms become log-mel spectrograms, a BatchNorm over mel bins, a patch embedding, and a stack
    of transformer blocks. Inputs longer than ``target_length`` frames are cut into chunks of
    ``target_length // frames_per_patch`` tokens; each chunk gets time positions from zero and
    attends only within itself, and the chunk outputs are concatenated.

    Args:
        config: encoder hyper-parameters (``audio_encoder_config`` of the checkpoint).
    """

    def __init__(self, config: DashengConfig) -> None:
        super().__init__()
        self.config = config
        self.front_end = LogMelFrontEnd(config)
        # BatchNorm2d over mel bins: the spectrogram is transposed so that bins are channels.
        self.init_bn = nn.BatchNorm2d(config.n_mels, momentum=0.01)
        self.patch_embed = PatchEmbed(config)
        freq_patches = config.n_mels // config.patch_stride[0]
        self.time_pos_embed = nn.Parameter(torch.zeros(1, config.embed_dim, 1, config.patches_per_chunk))
        self.freq_pos_embed = nn.Parameter(torch.zeros(1, config.embed_dim, freq_patches, 1))
        self.blocks = nn.ModuleList(DashengBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.time_pos_embed, std=0.02)
        nn.init.trunc_normal_(self.freq_pos_embed, std=0.02)

    def log_mel(self, waveforms: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """``(B, samples)`` → ``(B, n_mels, frames)`` for the padded width.

        With ``lengths`` each clip's frames (the reflect padding at its end, its 120 dB floor) do
        not depend on what it was batched with; frames past a clip's end are zero (see
        :meth:`LogMelFrontEnd.forward`).
        """
        return self.front_end(waveforms, lengths)

    def patchify(self, mel: torch.Tensor) -> torch.Tensor:
        """``(B, n_mels, frames)`` → ``(B, D, 1, patches)``."""
        x = mel.to(self.time_pos_embed.dtype).unsqueeze(1)  # (B, 1, mels, frames)
        x = self.init_bn(x.transpose(1, 2)).transpose(1, 2)
        return self.patch_embed(x)

    def encode_chunk(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """One chunk ``(B, D, 1, t)`` → ``(B, t, D)``; time positions restart at zero."""
        t = x.shape[-1]
        x = x + self.time_pos_embed[..., :t] + self.freq_pos_embed
        x = x.flatten(2).transpose(1, 2)
        if key_mask is not None:
            # A clip that ended before this chunk has no key to attend to; letting its (discarded)
            # rows see every key avoids NaNs from an all-masked softmax.
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    def forward(
        self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode ``(B, samples)`` waveforms (right-padded; ``lengths`` in samples).

        Returns:
            ``(B, patches, D)`` token states and the ``(B, patches)`` boolean key mask (``None``
            without lengths).
        """
        patches = self.patchify(self.log_mel(waveforms, lengths))
        num_patches = patches.shape[-1]
        mask = None
        if lengths is not None:
            valid = lengths.to(patches.device) // (self.config.hop_length * self.config.frames_per_patch)
            mask = torch.arange(num_patches, device=patches.device)[None, :] < valid[:, None]
        step = self.config.patches_per_chunk
        outputs = []
        for start in range(0, num_patches, step):
            chunk_mask = None if mask is None else mask[:, start : start + step]
            outputs.append(self.encode_chunk(patches[..., start : start + step], chunk_mask))
        return torch.cat(outputs, dim=1), mask


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())

"""MiDashengLM (Dinkel et al., arXiv 2508.03983) as an audio/text embedding backbone (ALM2Vec).

Architecture (parameter names as in the published checkpoint ``mispeech/midashenglm-7b``):

- ``audio_encoder``: Dasheng-0.6B over 64-band log-mels (see :mod:`.dasheng`), one token per 40 ms,
  encoded in chunks of ``target_length`` frames (1008 frames ≈ 10 s).
- ``audio_projector.net.{0,2}``: stacks ``subsample_factor`` = 5 consecutive encoder tokens
  (5 Hz), then Linear → GELU → Linear to the decoder width.
- ``decoder.model``: the Qwen2.5-Omni-7B thinker text model (``Qwen2_5OmniThinkerTextModel``), and
  ``decoder.lm_head`` (untied). Audio placeholder tokens ``<|AUDIO|>`` in ``input_ids`` are replaced
  by the projected audio tokens. Positions are plain 1-D positions: the text model copies them to its
  three M-RoPE sections, which makes M-RoPE equal to ordinary RoPE; this is what the official
  modeling code does when it passes no positions, and what vLLM and SGLang do (they drop
  ``mrope_section``).

Prompt (Qwen2.5-Omni chat format, as MiDashengLM's chat template renders a system and a user turn)::

    <|im_start|>system\\n{system_prompt}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>

with ``content`` = instruction, audio block ``<|audio_bos|>`` + N × ``<|AUDIO|>`` + ``<|audio_eos|>``
and text, each present part separated by a newline. The template's trailing newline after the
final ``<|im_end|>`` is left out, so the last non-pad token of every sequence is the end-of-turn
token ``<|im_end|>`` (id 151645 in the Qwen vocabulary): ALM2Vec's "[EOS]" embedding position.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniRotaryEmbedding,
    Qwen2_5OmniThinkerTextModel,
)

from datamodules.inputs import AUDIO_SLOT, EmbedInput
from datamodules.text_limits import (
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_TEXT_TOKENS,
    check_limits,
    check_prompt_lengths,
    truncate_inputs,
)
from lightning_modules.adapters import LoraSettings
from lightning_modules.backbones.base import Backbone, BackboneOutput, cache_keyword, output_cache, pad_right, shared_prefix_split
from lightning_modules.backbones.dasheng import DashengConfig, DashengEncoder, num_encoder_patches
from lightning_modules.backbones.offline_tokenizer import build_offline_tokenizer

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
#: the system turn of the official usage example (README of mispeech/midashenglm-7b).
DEFAULT_SYSTEM_PROMPT = "You are a helpful language and speech assistant."
#: shorter clips are zero-padded to 0.2 s so that they yield at least one audio token (vLLM's
#: MiDashengLM processor does the same).
MIN_AUDIO_SAMPLES = 3200
#: the published checkpoint still stores the torchaudio buffers of an older front end; the
#: filterbank and window are recomputed here, so these keys are accepted and skipped.
LEGACY_FRONT_END_KEYS = (
    "audio_encoder.front_end.0.mel_scale.fb",
    "audio_encoder.front_end.0.spectrogram.window",
)


@dataclass
class MiDashengLMConfig:
    """Configuration of MiDashengLM (arXiv 2508.03983), with the layout of the checkpoint's ``config.json``.

    Attributes:
        audio_encoder_config: the Dasheng encoder.
        text_config: the Qwen2.5-Omni thinker text model.
        subsample_factor: encoder tokens stacked into one decoder token.
        audio_token_id: id of the ``<|AUDIO|>`` placeholder.
    """

    audio_encoder_config: DashengConfig
    text_config: Qwen2_5OmniTextConfig
    subsample_factor: int = 5
    audio_token_id: int = 151646

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MiDashengLMConfig:
        return cls(
            audio_encoder_config=DashengConfig.from_dict(values.get("audio_encoder_config") or {}),
            text_config=Qwen2_5OmniTextConfig(**(values.get("text_config") or {})),
            subsample_factor=int(values.get("subsample_factor", 5)),
            audio_token_id=int(values["audio_token_id"]),
        )

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MiDashengLMConfig:
        return cls.from_dict(json.loads((Path(directory) / "config.json").read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["MiDashengLMModel"],
            "model_type": "midashenglm",
            "audio_encoder_config": self.audio_encoder_config.to_dict(),
            "text_config": self.text_config.to_dict(),
            "subsample_factor": self.subsample_factor,
            "audio_token_id": self.audio_token_id,
        }

    @classmethod
    def midashenglm_7b(cls) -> MiDashengLMConfig:
        """MiDashengLM-7B: Dasheng-0.6B encoder and the Qwen2.5-Omni-7B thinker text model."""
        encoder = DashengConfig(
            embed_dim=1280,
            depth=32,
            num_heads=16,
            patch_size=[64, 4],
            patch_stride=[64, 4],
            target_length=1008,
        )
        text = Qwen2_5OmniTextConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            tie_word_embeddings=False,
        )
        return cls(encoder, text, subsample_factor=5, audio_token_id=151646)

    @classmethod
    def tiny(cls) -> MiDashengLMConfig:
        """Same architecture and front end, tiny widths: for tests and the demo.

        Chunks are 96 frames (0.96 s) so that short test clips already span several chunks; the
        special-token ids match :func:`build_tiny_tokenizer`.
        """
        encoder = DashengConfig(
            embed_dim=32,
            depth=2,
            num_heads=4,
            patch_size=[64, 4],
            patch_stride=[64, 4],
            target_length=96,
        )
        text = Qwen2_5OmniTextConfig(
            vocab_size=384,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            # mrope sections must add up to head_dim / 2 = 4
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            tie_word_embeddings=False,
        )
        return cls(encoder, text, subsample_factor=5, audio_token_id=TINY_SPECIAL_TOKENS.index(AUDIO_TOKEN))


def audio_token_count(num_samples: int | torch.Tensor, config: MiDashengLMConfig) -> int | torch.Tensor:
    """Decoder tokens for one clip: encoder tokens (``frames // 4``), grouped by ``subsample_factor``
    (elementwise for a tensor of lengths)."""
    return num_encoder_patches(num_samples, config.audio_encoder_config) // config.subsample_factor


class AudioProjector(nn.Module):
    """MiDashengLM's subsampling projector: stack ``k`` consecutive frames, then fc1, GELU, fc2.

    Trailing frames that do not fill a group are dropped, as in the official model.

    Args:
        in_dim: encoder width.
        out_dim: decoder width.
        k: frames stacked per output token.
    """

    def __init__(self, in_dim: int, out_dim: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(in_dim * k, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, frames, dim = x.shape
        usable = frames - frames % self.k
        stacked = x[:, :usable].reshape(batch, usable // self.k, self.k * dim)
        token_mask = None if mask is None else mask[:, :usable].reshape(batch, -1, self.k).any(dim=-1)
        return self.net(stacked), token_mask


class TextDecoder(nn.Module):
    """``model`` (Qwen2.5-Omni thinker text model) and an untied ``lm_head``, as in the checkpoint.

    Args:
        config: the text model config.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
    """

    def __init__(self, config: Qwen2_5OmniTextConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.model = Qwen2_5OmniThinkerTextModel._from_config(config, attn_implementation=attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose tensors do not match the model; the message lists every offending key."""

    def __init__(
        self,
        directory: str | Path,
        missing: list[str],
        unexpected: list[str],
        wrong_shape: list[str],
    ) -> None:
        self.missing = missing
        self.unexpected = unexpected
        self.wrong_shape = wrong_shape
        lines = [f"checkpoint {directory} does not match the MiDashengLM architecture"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                lines.append(f"{title} ({len(keys)}):")
                lines.extend(f"  {key}" for key in keys)
        super().__init__("\n".join(lines))


def read_safetensors(directory: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors checkpoint, floats cast to ``dtype``."""
    directory = Path(directory)
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        shards: dict[str, list[str] | None] = {}
        for key, shard in json.loads(index_path.read_text())["weight_map"].items():
            shards.setdefault(shard, []).append(key)
    elif (directory / "model.safetensors").is_file():
        shards = {"model.safetensors": None}
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")

    state: dict[str, torch.Tensor] = {}
    for shard, keys in shards.items():
        if not (directory / shard).is_file():
            raise FileNotFoundError(f"shard {shard} named in {index_path} is not in {directory}")
        with safe_open(directory / shard, framework="pt") as handle:
            available = set(handle.keys())
            wanted = sorted(available) if keys is None else keys
            absent = sorted(set(wanted) - available)
            if absent:
                raise KeyError(f"{shard} lacks tensors its index lists: {', '.join(absent)}")
            for key in wanted:
                tensor = handle.get_tensor(key)
                state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


class MiDashengLM(nn.Module):
    """MiDashengLM (Dinkel et al., "MiDashengLM: Efficient Audio Understanding with General Audio
    Captions", arXiv 2508.03983): Dasheng encoder, subsampling projector, Qwen2.5-Omni text decoder.

    Args:
        config: the model configuration.
        attn_implementation: attention kernel of the text decoder.
    """

    def __init__(self, config: MiDashengLMConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.audio_encoder = DashengEncoder(config.audio_encoder_config)
        self.audio_projector = AudioProjector(
            config.audio_encoder_config.embed_dim, config.text_config.hidden_size, config.subsample_factor
        )
        self.decoder = TextDecoder(config.text_config, attn_implementation)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states ``(B, T, H)`` of the text decoder."""
        return decoder_hidden_states(self, self.config, input_ids, attention_mask, audio, audio_lengths)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
    ) -> MiDashengLM:
        """Load a checkpoint directory in the official layout with strict key checking.

        Reads ``config.json``, builds the model on the meta device, reads the safetensors shards
        named by ``model.safetensors.index.json`` (or ``model.safetensors``) and assigns them.
        Raises :class:`CheckpointMismatchError` listing every missing, unexpected or misshapen
        tensor. BatchNorm's ``num_batches_tracked`` may be absent (it is unused in eval mode).
        """
        config = MiDashengLMConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = cls(config, attn_implementation)
        state = _checked_state_dict(model, read_safetensors(directory, dtype), directory)
        model.load_state_dict(state, strict=True, assign=True)
        # Non-persistent buffers are not in checkpoints: rebuild the rotary tables off the meta device.
        text_model = model.decoder.model
        text_model.rotary_emb = Qwen2_5OmniRotaryEmbedding(config=text_model.config)
        on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if on_meta:
            raise RuntimeError(f"tensors left on the meta device after loading: {', '.join(on_meta)}")
        return model


def _checked_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], directory: str | Path
) -> dict[str, torch.Tensor]:
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    encoder_config = model.config.audio_encoder_config
    legacy_shapes = {
        LEGACY_FRONT_END_KEYS[0]: (encoder_config.n_fft // 2 + 1, encoder_config.n_mels),
        LEGACY_FRONT_END_KEYS[1]: (encoder_config.win_length,),
    }
    optional = {key for key in expected if key.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected) - set(legacy_shapes))
    wrong_shape = sorted(
        f"{key}: checkpoint {tuple(state[key].shape)}, model {shape}"
        for key, shape in {**expected, **legacy_shapes}.items()
        if key in state and tuple(state[key].shape) != shape
    )
    if missing or unexpected or wrong_shape:
        raise CheckpointMismatchError(directory, missing, unexpected, wrong_shape)
    kept = {key: tensor for key, tensor in state.items() if key in expected}
    for key in optional - set(state):
        kept[key] = torch.zeros((), dtype=torch.long)
    return kept


def decoder_hidden_states(
    model: nn.Module,
    config: MiDashengLMConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    audio: torch.Tensor | None = None,
    audio_lengths: torch.Tensor | None = None,
    audio_grad: bool = True,
) -> torch.Tensor:
    """Run a MiDashengLM-shaped ``model`` (ours, or the official remote-code one) to the last layer.

    ``model`` needs ``audio_encoder(waveforms, lengths) -> (states, mask)``,
    ``audio_projector(states, mask) -> (tokens, mask)`` and ``decoder.model`` (the text model).
    ``audio`` holds one row per clip, in the order the clips' placeholders appear in the batch, and
    the placeholders must be exactly the clips' audio tokens, as :class:`MiDashengLMCollator`
    checks. Nothing is read back from the device here (no host synchronisation per batch).
    """
    text_model = model.decoder.model
    embeds = input_embeddings(model, config, input_ids, audio, audio_lengths, audio_grad)
    # Right padding: real tokens get positions 0, 1, ... exactly as when run alone.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    output = text_model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return output.last_hidden_state


def input_embeddings(
    model: nn.Module,
    config: MiDashengLMConfig,
    input_ids: torch.Tensor,
    audio: torch.Tensor | None = None,
    audio_lengths: torch.Tensor | None = None,
    audio_grad: bool = True,
) -> torch.Tensor:
    """Token embeddings with each clip's projected audio tokens at its placeholders (the collator has
    checked that the placeholders and the clips' token counts agree)."""
    embeds = model.decoder.model.get_input_embeddings()(input_ids)
    if audio is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and audio_grad):
            tokens, counts = _encode_audio(model, config, audio, audio_lengths)
        embeds = _place_audio_tokens(embeds, input_ids == config.audio_token_id, tokens, counts)
    return embeds


def _encode_audio(
    model: nn.Module, config: MiDashengLMConfig, audio: torch.Tensor, audio_lengths: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected audio tokens ``(clips, slots, H)`` and each clip's count of real ones (the first)."""
    if audio_lengths is None:
        audio_lengths = torch.full((audio.shape[0],), audio.shape[-1], dtype=torch.long, device=audio.device)
    states, mask = model.audio_encoder(audio, audio_lengths)
    tokens, _ = model.audio_projector(states, mask)
    return tokens, audio_token_count(audio_lengths.to(tokens.device), config)


def _place_audio_tokens(
    embeds: torch.Tensor, placeholders: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """``embeds`` with the k-th placeholder (in reading order) replaced by the k-th real audio token:
    the first ``counts[c]`` slots of clip ``c``, clip after clip. Selecting the real tokens with a
    boolean mask would make their number a host value; a sorted search finds each placeholder's
    slot on the device instead."""
    clips, slots, width = tokens.shape
    real = torch.arange(slots, device=tokens.device)[None, :] < counts[:, None]
    real_so_far = real.flatten().cumsum(0)  # real tokens up to and including each slot
    rank = placeholders.flatten().long().cumsum(0)  # 1 for the first placeholder, 2 for the next, ...
    slot = torch.searchsorted(real_so_far, rank).clamp(max=clips * slots - 1)
    source = tokens.reshape(clips * slots, width)[slot].view(*placeholders.shape, width)
    return torch.where(placeholders.unsqueeze(-1), source.to(embeds.dtype), embeds)


#: special tokens of the tiny tokenizer, in the order of their Qwen ids 151643..151648.
TINY_SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)


def build_tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """An offline byte-level BPE tokenizer with the prompt's special tokens (for the tiny model)."""
    return build_offline_tokenizer(TINY_SPECIAL_TOKENS, vocab_size=vocab_size, pad_token=PAD_TOKEN, eos_token=IM_END)


def format_prompt(
    instruction: str | None,
    text: str | None,
    num_audio_tokens: int,
    system_prompt: str | None,
    generation_prompt: bool = False,
) -> str:
    """The chat-formatted prompt of one input; it ends with ``<|im_end|>`` (see the module docstring),
    or with ``generation_prompt`` after the opening of the assistant turn, the audio then going to the
    text's :data:`~datamodules.inputs.AUDIO_SLOT` if it has one."""
    audio = AUDIO_BOS + AUDIO_TOKEN * num_audio_tokens + AUDIO_EOS if num_audio_tokens else None
    if generation_prompt and text is not None and AUDIO_SLOT in text:
        if audio is None:
            raise ValueError(f"an input without audio has an audio slot {AUDIO_SLOT!r} in its text")
        text, audio = text.replace(AUDIO_SLOT, audio, 1), None
    content = "\n".join(part for part in (instruction, audio, text) if part)
    system = f"{IM_START}system\n{system_prompt}{IM_END}\n" if system_prompt else ""
    prompt = f"{system}{IM_START}user\n{content}{IM_END}"
    return f"{prompt}\n{IM_START}assistant\n" if generation_prompt else prompt


@dataclass
class MiDashengLMCollator:
    """Builds MiDashengLM batches from :class:`EmbedInput` lists (picklable for data-loader workers).

    Output keys: ``input_ids`` and ``attention_mask`` (right-padded), and when the batch has audio,
    ``audio`` ``(clips, samples)`` float32 right-padded with zeros and ``audio_lengths`` in samples;
    clips appear in batch order. Clips under 0.2 s are zero-padded to 0.2 s. Texts and instructions
    are cut to ``max_text_tokens`` tokens first (:meth:`truncate`), and a prompt longer than
    ``max_prompt_tokens`` raises :class:`~datamodules.text_limits.PromptTooLongError`.

    Args:
        tokenizer: the checkpoint's tokenizer (it must know the prompt's special tokens).
        config: the model config (audio token arithmetic).
        system_prompt: text of the system turn, or ``None`` for no system turn.
        generation_prompt: end each prompt where the assistant's answer begins (see
            :meth:`~lightning_modules.backbones.base.Backbone.collator`).
        max_text_tokens: tokens kept of each text and instruction (``None``: all).
        max_prompt_tokens: the longest prompt accepted (``None``: any).
    """

    tokenizer: PreTrainedTokenizerBase
    config: MiDashengLMConfig
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    generation_prompt: bool = False
    max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS
    max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS

    def __post_init__(self) -> None:
        check_limits(self.max_text_tokens, self.max_prompt_tokens)

    def truncate(self, items: list[EmbedInput]) -> tuple[list[EmbedInput], int]:
        """The inputs with their texts cut to ``max_text_tokens``, and how many were cut."""
        return truncate_inputs(self.tokenizer, items, self.max_text_tokens)

    def __call__(self, items: list[EmbedInput]) -> dict[str, torch.Tensor]:
        items, _ = self.truncate(items)
        prompts, clips, expected = [], [], []
        for item in items:
            num_audio_tokens = 0
            if item.audio is not None:
                clip = item.audio
                if clip.shape[0] < MIN_AUDIO_SAMPLES:
                    clip = np.pad(clip, (0, MIN_AUDIO_SAMPLES - clip.shape[0]))
                clips.append(clip)
                num_audio_tokens = audio_token_count(clip.shape[0], self.config)
            prompts.append(
                format_prompt(item.instruction, item.text, num_audio_tokens, self.system_prompt, self.generation_prompt)
            )
            expected.append(num_audio_tokens)
        encoded = self.tokenizer(
            prompts, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt"
        )
        check_prompt_lengths(encoded["attention_mask"].sum(-1).tolist(), self.max_prompt_tokens)
        # The model puts the clips' tokens at the placeholders without reading anything back from
        # the device, so their number is checked here, where it is free.
        found = (encoded["input_ids"] == self.config.audio_token_id).sum(dim=1).tolist()
        for item, count, wanted in zip(items, found, expected):
            if count != wanted:
                raise ValueError(
                    f"the prompt of an input holds {count} {AUDIO_TOKEN} tokens where its audio gives "
                    f"{wanted}: its instruction or text must not contain {AUDIO_TOKEN} "
                    f"(instruction {item.instruction!r}, text {item.text!r})"
                )
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if clips:
            lengths = [clip.shape[0] for clip in clips]
            audio = np.zeros((len(clips), max(lengths)), dtype=np.float32)
            for row, clip in enumerate(clips):
                audio[row, : clip.shape[0]] = clip
            batch["audio"] = torch.from_numpy(audio)
            batch["audio_lengths"] = torch.tensor(lengths, dtype=torch.long)
        return batch


def _checkpoint_directory(name_or_path: str) -> Path:
    """A local directory as is; otherwise a hub id downloaded (config, tokenizer and weights only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]
    return Path(snapshot_download(name_or_path, allow_patterns=patterns))


class MiDashengLMBackbone(Backbone):
    """MiDashengLM (arXiv 2508.03983) as the ALM2Vec encoder: chat-formatted prompts in, the text
    decoder's last-layer states out; the embedding is read at the final ``<|im_end|>`` token.

    Args:
        name_or_path: local checkpoint directory or hub id (e.g. ``mispeech/midashenglm-7b``) in the
            official layout. Mutually exclusive with ``tiny``.
        tiny: build the tiny random-init configuration with an offline tokenizer (tests, demo).
        dtype: parameter dtype, e.g. ``"float32"`` or ``"bfloat16"``; the mel front end always runs
            in float32.
        attn_implementation: attention kernel of the text decoder (``"sdpa"``, ``"eager"``,
            ``"flash_attention_2"``).
        trust_remote_code: load the official modeling code with
            ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` instead of this
            module's implementation: it runs Python code from the checkpoint, so it is off unless a
            config turns it on, and a warning is logged when it is. Needs network access to the hub.
        freeze_audio_encoder: freeze the whole audio path (Dasheng encoder and projector): no
            gradients, and kept in eval mode even when the backbone is put in train mode.
        system_prompt: text of the system turn; ``None`` leaves the system turn out.
        lora: LoRA adapters on the text decoder (ALM2Vec: q_proj, k_proj, v_proj; dropout 0.05);
            the decoder's base weights are then frozen. With ``lora.quantize_4bit`` the decoder's
            linear layers are quantised to NF4 after loading, on this process's device (QLoRA).
        gradient_checkpointing: recompute the text decoder's activations in the backward pass
            (non-reentrant; composes with FSDP2, whose hooks stay outside the recomputed region).
        max_text_tokens: every text and instruction of an input is cut to this many tokens
            (AuroLA's 480); the cut inputs are counted (``data/truncated/...``). ``None``: no cut.
        max_prompt_tokens: a longer prompt (instruction, texts and audio tokens) stops with an
            error naming the row (AuroLA's 1024). ``None``: no limit.
    """

    sampling_rate = 16000

    def __init__(
        self,
        name_or_path: str | None = None,
        tiny: bool = False,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        freeze_audio_encoder: bool = True,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
        max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    ) -> None:
        super().__init__(name_or_path, tiny, dtype)
        if tiny and trust_remote_code:
            raise ValueError("trust_remote_code needs a real checkpoint (name_or_path)")
        torch_dtype = self.param_dtype
        if tiny:
            self.config = MiDashengLMConfig.tiny()
            self.model = MiDashengLM(self.config, attn_implementation).to(torch_dtype)
            self._tokenizer = build_tiny_tokenizer(self.config.text_config.vocab_size)
        elif trust_remote_code:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            log.warning("trust_remote_code=True: running the modeling code that comes with %s", name_or_path)
            self.model = AutoModelForCausalLM.from_pretrained(
                name_or_path, trust_remote_code=True, dtype=torch_dtype, attn_implementation=attn_implementation
            )
            self.config = MiDashengLMConfig.from_dict(self.model.config.to_dict())
            self._tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        else:
            from transformers import AutoTokenizer

            directory = _checkpoint_directory(name_or_path)
            self.model = MiDashengLM.from_pretrained(directory, torch_dtype, attn_implementation)
            self.config = self.model.config
            self._tokenizer = AutoTokenizer.from_pretrained(directory)
        self._check_tokenizer()
        if self.config.audio_encoder_config.sample_rate != self.sampling_rate:
            raise ValueError(f"expected a {self.sampling_rate} Hz audio encoder")
        self.hidden_size = self.config.text_config.hidden_size
        self.system_prompt = system_prompt
        self.freeze_audio_encoder = freeze_audio_encoder
        check_limits(max_text_tokens, max_prompt_tokens)
        self.max_text_tokens = max_text_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.setup_training(lora, freeze_audio_encoder, gradient_checkpointing)

    def _check_tokenizer(self) -> None:
        audio_id = self.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
        if audio_id != self.config.audio_token_id:
            raise ValueError(
                f"tokenizer maps {AUDIO_TOKEN} to {audio_id}, the config expects {self.config.audio_token_id}"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = PAD_TOKEN

    @property
    def language_model(self) -> nn.Module:
        """The text decoder (``Qwen2_5OmniThinkerTextModel``): the place for LoRA on q/k/v_proj."""
        return self.model.decoder.model

    @property
    def audio_encoder(self) -> nn.Module:
        """The Dasheng encoder."""
        return self.model.audio_encoder

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def output_head(self) -> nn.Module:
        """The decoder's LM head (always loaded, frozen)."""
        return self.model.decoder.lm_head

    def audio_modules(self) -> list[str]:
        return ["model.audio_encoder", "model.audio_projector"]

    def unused_parameters(self) -> list[nn.Parameter]:
        # Embeddings never reach the LM head (the re-ranker reads it frozen).
        return list(self.model.decoder.lm_head.parameters())

    def collator(self, generation_prompt: bool = False) -> MiDashengLMCollator:
        return MiDashengLMCollator(
            self.tokenizer, self.config, self.system_prompt, generation_prompt,
            max_text_tokens=self.max_text_tokens, max_prompt_tokens=self.max_prompt_tokens,
        )

    def shard_units(self) -> list[nn.Module]:
        return [*self.language_model.layers, *self.audio_encoder.blocks]

    def forward(self, inputs: dict[str, torch.Tensor]) -> BackboneOutput:
        audio = inputs.get("audio")
        if audio is not None and audio.dtype in (torch.bfloat16, torch.float16):
            # bfloat16 keeps 8 significant bits: the waveform would reach the float32 mel front end
            # with its rounding noise about 50 dB below the signal, inside the 120 dB range it keeps.
            raise ValueError(
                f"MiDashengLM needs the float32 waveform, got {audio.dtype}: Lightning's 'bf16-true' and "
                "'16-true' precisions round every floating input; use --trainer.precision bf16-mixed with "
                "--model.backbone.init_args.dtype bfloat16 (bfloat16 weights, float32 audio front end)"
            )
        hidden_states = decoder_hidden_states(
            self.model,
            self.config,
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs.get("audio"),
            inputs.get("audio_lengths"),
            audio_grad=not self.freeze_audio_encoder,
        )
        return BackboneOutput(
            hidden_states=hidden_states,
            attention_mask=inputs["attention_mask"],
            input_ids=inputs["input_ids"],
            emb_token_id=None,
        )

    def forward_shared_prefix(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        prefix, rests = shared_prefix_split(inputs)
        if any(bool((rest == self.config.audio_token_id).any()) for rest in rests):
            raise ValueError("forward_shared_prefix needs every audio token inside the shared prefix")
        prefix_ids = prefix[None]
        audio = inputs.get("audio")
        lengths = inputs.get("audio_lengths")
        embeds = input_embeddings(
            self.model, self.config, prefix_ids,
            None if audio is None else audio[:1], None if lengths is None else lengths[:1],
        )
        text_model = self.language_model
        keyword = cache_keyword(text_model.forward)
        ones = torch.ones_like(prefix_ids)
        positions = torch.arange(prefix_ids.shape[1], device=prefix_ids.device)[None]
        cache = output_cache(text_model(inputs_embeds=embeds, attention_mask=ones, position_ids=positions, use_cache=True))
        cache.batch_repeat_interleave(len(rests))
        ids, mask = pad_right(rests, self.tokenizer.pad_token_id)
        # Right padding: the remainders continue the prefix's positions, as in the whole prompt.
        positions = (prefix_ids.shape[1] + torch.arange(ids.shape[1], device=ids.device)).expand(*ids.shape)
        hidden = text_model(
            inputs_embeds=text_model.get_input_embeddings()(ids),
            attention_mask=torch.cat([ones.expand(len(rests), -1), mask], dim=1),
            position_ids=positions,
            use_cache=False,
            **{keyword: cache},
        ).last_hidden_state
        return hidden[torch.arange(len(rests), device=ids.device), mask.sum(1) - 1]

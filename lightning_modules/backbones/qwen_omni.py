"""Qwen2.5-Omni thinker as an embedding backbone (AuroLA, Omni-Embed-Audio)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniThinkerModel,
    WhisperFeatureExtractor,
)

from datamodules.inputs import AUDIO_SLOT, EmbedInput
from datamodules.text_limits import (
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_TEXT_TOKENS,
    check_limits,
    check_prompt_lengths,
    truncate_inputs,
)
from lightning_modules.adapters import LoraSettings, local_device
from lightning_modules.backbones.base import Backbone, BackboneOutput, cache_keyword, output_cache, pad_right, shared_prefix_split
from lightning_modules.backbones.offline_tokenizer import build_offline_tokenizer

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
# The special tokens of the Qwen2.5-Omni vocabulary the prompts and the thinker need, in the order the
# tiny offline tokenizer assigns ids to them.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    AUDIO_TOKEN,
    "<|IMAGE|>",
    "<|VIDEO|>",
    AUDIO_BOS,
    AUDIO_EOS,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
]
#: Whisper frames a clip needs for the audio tower to emit at least one token (see
#: :func:`audio_token_count`); shorter clips are zero-padded to this many hops (30 ms at 16 kHz).
MIN_AUDIO_FRAMES = 3


def audio_token_count(feature_lengths: torch.Tensor | int) -> torch.Tensor | int:
    """Audio placeholder tokens the thinker's audio tower emits for ``L`` Whisper frames.

    Two stride-2 stages (a convolution, then average pooling): ``((L - 1) // 2 + 1 - 2) // 2 + 1``.
    """
    after_conv = (feature_lengths - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


@dataclass
class PromptTemplates:
    """Chat prompts per input modality, rendered in Qwen2.5-Omni's ChatML format.

    Placeholders: ``{audio}`` (the audio slot, wrapped in audio_bos/eos), ``{text}`` and
    ``{instruction}`` (empty when the input has none). The defaults are AuroLA's prompts: the
    assistant turn is ``<emb>.`` and the embedding is the state just before ``<emb>``.

    Args:
        system: system turn; ``None`` leaves it out.
        audio: user turn for audio-only inputs.
        text: user turn for text-only inputs.
        audio_text: user turn for inputs with audio and text.
        assistant: assistant turn that closes the prompt.
        chat: wrap the turns in ChatML markup; ``False`` feeds the user content alone (plain
            "query: ..." / "passage: ..." inputs as in Omni-Embed-Audio; ``system`` and
            ``assistant`` are then unused).
    """

    system: str | None = "You are a helpful assistant."
    audio: str = "{audio}Summarize above audio in one word:"
    text: str = "{text}\nSummarize above sentence in one word:"
    audio_text: str = "{audio}{text}\nSummarize above audio and sentence in one word:"
    assistant: str = "<emb>."
    chat: bool = True

    def render(self, item: EmbedInput, generation_prompt: bool = False) -> str:
        """The full prompt of ``item`` with a single ``<|AUDIO|>`` slot for its audio, if any.

        With ``generation_prompt`` the user turn is the input's text with its audio at
        :data:`~datamodules.inputs.AUDIO_SLOT` (or first), and the prompt ends where the assistant's
        answer begins (the modality templates and ``assistant`` are not used).
        """
        audio = f"{AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}"
        if generation_prompt:
            user = place_audio(item, audio)
        else:
            template = getattr(self, item.modality)
            user = template.format(audio=audio, text=item.text or "", instruction=item.instruction or "")
        if not self.chat:
            return user
        system = f"<|im_start|>system\n{self.system}<|im_end|>\n" if self.system is not None else ""
        prompt = f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        return prompt if generation_prompt else f"{prompt}{self.assistant}<|im_end|>\n"


def place_audio(item: EmbedInput, audio: str) -> str:
    """The input's instruction and text as one user message, with ``audio`` (the backbone's audio
    markup) at the text's :data:`~datamodules.inputs.AUDIO_SLOT`, or before the text without one."""
    text = item.text or ""
    if item.audio is not None:
        text = text.replace(AUDIO_SLOT, audio, 1) if AUDIO_SLOT in text else audio + text
    elif AUDIO_SLOT in text:
        raise ValueError(f"an input without audio has an audio slot {AUDIO_SLOT!r} in its text")
    return f"{item.instruction}\n{text}" if item.instruction else text


class QwenOmniCollator:
    """Builds thinker inputs exactly as ``Qwen2_5OmniProcessor`` would, without torchvision.

    Each audio's ``<|AUDIO|>`` slot is expanded to :func:`audio_token_count` placeholders. Whisper
    features are padded to the batch's longest clip rather than to 30 s: waveforms get zero padding
    past the longest clip (so its last frames see zeros, as in the 30 s padding), and the frames past
    the longest clip are dropped. Valid frames are identical to the official processor's. Clips
    shorter than :data:`MIN_AUDIO_FRAMES` hops are zero-padded to it, so that every clip gets at
    least one audio token.

    Texts and instructions are cut to ``max_text_tokens`` tokens first (:meth:`truncate`), and a
    prompt longer than ``max_prompt_tokens`` raises
    :class:`~datamodules.text_limits.PromptTooLongError` (see :mod:`datamodules.text_limits`).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        feature_extractor: WhisperFeatureExtractor,
        prompts: PromptTemplates,
        padding_side: str = "left",
        generation_prompt: bool = False,
        max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    ):
        check_limits(max_text_tokens, max_prompt_tokens)
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.prompts = prompts
        self.padding_side = padding_side
        self.generation_prompt = generation_prompt
        self.max_text_tokens = max_text_tokens
        self.max_prompt_tokens = max_prompt_tokens

    def truncate(self, items: list[EmbedInput]) -> tuple[list[EmbedInput], int]:
        """The inputs with their texts cut to ``max_text_tokens``, and how many were cut."""
        return truncate_inputs(self.tokenizer, items, self.max_text_tokens)

    def features(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        fe = self.feature_extractor
        shortest = MIN_AUDIO_FRAMES * fe.hop_length
        waves = [np.pad(w, (0, shortest - len(w))) if len(w) < shortest else w for w in waves]
        longest = max(len(w) for w in waves)
        if longest > fe.n_samples:
            raise ValueError(
                f"audio of {longest / fe.sampling_rate:.2f} s exceeds the feature extractor's "
                f"{fe.n_samples / fe.sampling_rate:.0f} s; crop it with the datamodule's max seconds"
            )
        frames = math.ceil(longest / fe.hop_length)
        margin = math.ceil(fe.n_fft / fe.hop_length) * fe.hop_length
        out = fe(
            waves,
            sampling_rate=fe.sampling_rate,
            padding="max_length",
            max_length=frames * fe.hop_length + margin,
            truncation=False,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_features"][..., :frames], out["attention_mask"][:, :frames]

    def __call__(self, items: list[EmbedInput]) -> dict[str, torch.Tensor]:
        items, _ = self.truncate(items)
        texts = [self.prompts.render(item, self.generation_prompt) for item in items]
        batch: dict[str, torch.Tensor] = {}
        waves = [item.audio for item in items if item.audio is not None]
        if waves:
            features, mask = self.features(waves)
            counts = iter(audio_token_count(mask.sum(-1)).tolist())
            texts = [
                t.replace(AUDIO_TOKEN, AUDIO_TOKEN * next(counts)) if item.audio is not None else t
                for t, item in zip(texts, items)
            ]
            batch["input_features"] = features
            batch["feature_attention_mask"] = mask
        enc = self.tokenizer(texts, padding=True, padding_side=self.padding_side, return_tensors="pt")
        check_prompt_lengths(enc["attention_mask"].sum(-1).tolist(), self.max_prompt_tokens)
        batch["input_ids"] = enc["input_ids"]
        batch["attention_mask"] = enc["attention_mask"]
        return batch


def tiny_thinker_config(
    tokenizer: PreTrainedTokenizerBase, num_mel_bins: int = 20, width: int = 32
) -> Qwen2_5OmniThinkerConfig:
    """A tiny thinker of the real architecture (at width 32, the sizes of transformers' own tests)."""
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    # M-RoPE splits half the head dim (width / 4 heads / 2) into temporal, height and width parts.
    half_head = width // 8
    mrope_section = [half_head // 4, half_head // 4, half_head // 2]
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(
            d_model=width,
            encoder_attention_heads=4,
            encoder_ffn_dim=width,
            encoder_layers=2,
            num_mel_bins=num_mel_bins,
            max_source_positions=1500,
            n_window=100,
            output_dim=width,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=width,
                           fullatt_block_indexes=[0]),
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
            max_position_embeddings=1024,
        ),
        audio_token_index=ids[AUDIO_TOKEN],
        image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids[AUDIO_BOS],
        audio_end_token_id=ids[AUDIO_EOS],
        vision_start_token_id=ids["<|vision_bos|>"],
        vision_end_token_id=ids["<|vision_eos|>"],
        position_id_per_seconds=25,
        seconds_per_chunk=2,
    )


def tiny_components(
    seed: int | None = 0, width: int = 32, lm_head: bool = False
) -> tuple[Qwen2_5OmniThinkerModel | Qwen2_5OmniThinkerForConditionalGeneration, PreTrainedTokenizerBase,
           WhisperFeatureExtractor]:
    """Tiny random thinker (with its LM head: ``...ForConditionalGeneration``), offline tokenizer and
    20-bin Whisper feature extractor.

    An integer ``seed`` re-seeds the global RNG first, so the model and whatever the caller builds
    after it (heads, LoRA adapters) are the same for the same seed; ``None`` draws the weights from the
    global RNG as it stands (fixed by ``seed_everything``), so a run's seed varies the model too.
    """
    tokenizer = build_offline_tokenizer(QWEN_SPECIAL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    feature_extractor = WhisperFeatureExtractor(feature_size=20, sampling_rate=16000, hop_length=160, n_fft=400)
    if seed is not None:
        torch.manual_seed(seed)
    cls = Qwen2_5OmniThinkerForConditionalGeneration if lm_head else Qwen2_5OmniThinkerModel
    model = cls(tiny_thinker_config(tokenizer, feature_extractor.feature_size, width))
    return model, tokenizer, feature_extractor


def load_thinker(
    name_or_path: str, dtype: torch.dtype, attn_implementation: str, quantize: LoraSettings | None = None,
    lm_head: bool = False,
) -> tuple[Qwen2_5OmniThinkerModel | Qwen2_5OmniThinkerForConditionalGeneration, PreTrainedTokenizerBase,
           WhisperFeatureExtractor]:
    """Thinker, tokenizer and feature extractor from a Qwen2.5-Omni (or thinker-only) checkpoint,
    such as AuroLA's released ones (``Jazzcharles/AuroLA-3B``, ``Jazzcharles/AuroLA-rerank-7B``).

    With ``quantize``, the language model's linear layers load as NF4 ``Linear4bit`` on this
    process's device (the audio and vision towers stay in ``dtype``). With ``lm_head`` the thinker
    is loaded with its LM head (``Qwen2_5OmniThinkerForConditionalGeneration``).
    """
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "qwen2_5_omni":  # the full Omni checkpoint nests the thinker's config
        config = config.thinker_config
    quantized = {}
    if quantize is not None:
        quantized = dict(
            quantization_config=quantize.bnb_config(skip_modules=["audio_tower", "visual", "lm_head"]),
            device_map={"": local_device()},
        )
    cls = Qwen2_5OmniThinkerForConditionalGeneration if lm_head else Qwen2_5OmniThinkerModel
    model = cls.from_pretrained(name_or_path, config=config, dtype=dtype, attn_implementation=attn_implementation,
                                **quantized)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    feature_extractor = WhisperFeatureExtractor.from_pretrained(name_or_path)
    return model, tokenizer, feature_extractor


class QwenOmniThinker(Backbone):
    """The thinker (audio tower + language model) of Qwen2.5-Omni, used as an encoder.

    Inputs are rendered as chat prompts (:class:`PromptTemplates`; AuroLA's by default), a marker
    token ``emb_token`` is added to the vocabulary (the embedding matrix grows only if the new id
    does not fit), and :meth:`forward` returns the language model's last hidden states, never the
    LM head. The vision tower is dropped by default: retrieval over audio and text never uses it.

    References:
        Xu et al., "Qwen2.5-Omni Technical Report", 2025.
        AuroLA: "Scaling Audio-Text Retrieval with Multimodal Large Language Model", arXiv 2602.18010.

    Args:
        name_or_path: hub id or local directory of a Qwen2.5-Omni checkpoint (full Omni or
            thinker-only), e.g. ``Qwen/Qwen2.5-Omni-3B``. Required unless ``tiny``.
        tiny: build a tiny random thinker of the same architecture with an offline tokenizer
            (tests and the CPU demo); ``name_or_path`` must then be ``None``.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``).
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        prompts: prompt templates per modality.
        emb_token: marker token appended by the assistant turn; ``None`` adds none (a re-ranker).
        padding_side: pad prompts on the ``left`` (as the official processor) or ``right``.
        keep_vision_tower: keep the (unused) vision tower's weights in memory.
        gradient_checkpointing: recompute language-model activations in the backward pass
            (non-reentrant; composes with FSDP2, whose hooks stay outside the recomputed region).
        lora: LoRA adapters on the language model (its base weights are then frozen); with
            ``lora.quantize_4bit`` the language model's linear layers are NF4 (QLoRA).
        freeze_audio_encoder: freeze the audio tower and keep it in eval mode.
        seed: random seed of the tiny model's initialisation; it re-seeds the global RNG, so the
            head and LoRA initialisation built after the backbone follow it too. ``null``: the tiny
            model is drawn from the run's RNG as ``seed_everything`` left it, so runs under different
            ``seed_everything`` values (``sweep --seeds``) start from different models.
        tiny_width: hidden width of the tiny model's audio tower and language model.
        lm_head: keep the thinker's LM head (frozen), exposed as :attr:`output_head`, for scoring
            answer tokens (the re-ranker).
        max_text_tokens: every text and instruction of an input is cut to this many tokens
            (AuroLA: 480); the cut inputs are counted (``data/truncated/...``). ``None``: no cut.
        max_prompt_tokens: a longer prompt (template, texts and audio tokens) stops with an error
            naming the row (AuroLA: 1024). ``None``: no limit.
    """

    sampling_rate = 16000

    def __init__(
        self,
        name_or_path: str | None = None,
        tiny: bool = False,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        prompts: PromptTemplates | None = None,
        emb_token: str = "<emb>",
        padding_side: Literal["left", "right"] = "left",
        keep_vision_tower: bool = False,
        gradient_checkpointing: bool = False,
        lora: LoraSettings | None = None,
        freeze_audio_encoder: bool = False,
        seed: int | None = 0,
        tiny_width: int = 32,
        lm_head: bool = False,
        max_text_tokens: int | None = DEFAULT_MAX_TEXT_TOKENS,
        max_prompt_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
    ):
        super().__init__(name_or_path, tiny, dtype)
        check_limits(max_text_tokens, max_prompt_tokens)
        self.max_text_tokens = max_text_tokens
        self.max_prompt_tokens = max_prompt_tokens
        quantize_at_load = lora is not None and lora.quantize_4bit and not tiny
        if tiny:
            model, tokenizer, feature_extractor = tiny_components(seed, tiny_width, lm_head)
            model = model.to(self.param_dtype)
        else:
            model, tokenizer, feature_extractor = load_thinker(
                name_or_path, self.param_dtype, attn_implementation, lora if quantize_at_load else None, lm_head
            )
        head = None
        if lm_head:
            model, head = model.model, model.lm_head
        if not keep_vision_tower:
            del model.visual
        if emb_token is not None:
            tokenizer.add_tokens([emb_token], special_tokens=True)
            self.emb_token_id = tokenizer.convert_tokens_to_ids(emb_token)
            if self.emb_token_id >= model.get_input_embeddings().num_embeddings:
                if head is not None:
                    raise ValueError("lm_head needs emb_token: null (the marker would be missing from the LM head)")
                model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.model = model
        self.lm_head = head.requires_grad_(False) if head is not None else None
        self.hidden_size = model.config.text_config.hidden_size
        self._tokenizer = tokenizer
        self._collator_args = (tokenizer, feature_extractor, prompts or PromptTemplates(), padding_side)
        self.setup_training(lora, freeze_audio_encoder, gradient_checkpointing, quantized_at_load=quantize_at_load)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.language_model

    @property
    def audio_encoder(self) -> torch.nn.Module:
        return self.model.audio_tower

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def output_head(self) -> torch.nn.Module | None:
        return self.lm_head

    def audio_modules(self) -> list[str]:
        return ["model.audio_tower"]

    def unused_parameters(self) -> list[torch.nn.Parameter]:
        # The thinker never reads the audio tower's own bos/eos embedding.
        return [self.model.audio_tower.audio_bos_eos_token]

    def collator(self, generation_prompt: bool = False) -> QwenOmniCollator:
        return QwenOmniCollator(*self._collator_args, generation_prompt=generation_prompt,
                                max_text_tokens=self.max_text_tokens, max_prompt_tokens=self.max_prompt_tokens)

    def shard_units(self) -> list[torch.nn.Module]:
        return [*self.model.language_model.layers, *self.model.audio_tower.layers]

    def forward(self, inputs: dict[str, torch.Tensor]) -> BackboneOutput:
        out = self.model(**inputs, use_cache=False)
        return BackboneOutput(out.last_hidden_state, inputs["attention_mask"], inputs["input_ids"], self.emb_token_id)

    def forward_shared_prefix(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        prefix, rests = shared_prefix_split(inputs)
        audio_id = self.model.config.audio_token_id
        if any(bool((rest == audio_id).any()) for rest in rests):
            raise ValueError("forward_shared_prefix needs every audio token inside the shared prefix")
        prefix_ids = prefix[None]
        ones = torch.ones_like(prefix_ids)
        prefix_inputs = {"input_ids": prefix_ids, "attention_mask": ones}
        if "input_features" in inputs:  # the rows' audio is the same clip: the first row's features
            prefix_inputs["input_features"] = inputs["input_features"][:1]
            prefix_inputs["feature_attention_mask"] = inputs["feature_attention_mask"][:1]
        cache = output_cache(self.model(**prefix_inputs, use_cache=True))
        cache.batch_repeat_interleave(len(rests))
        # M-RoPE: audio positions advance with time, text after it one per token from the prefix's
        # largest position on (what the thinker's own 3-D positions give text after the audio).
        lengths = prefix_inputs["feature_attention_mask"].sum(-1) if "input_features" in inputs else None
        prefix_positions, _ = self.model.get_rope_index(prefix_ids, attention_mask=ones, audio_seqlens=lengths)
        ids, mask = pad_right(rests, self.tokenizer.pad_token_id)
        start = int(prefix_positions.max()) + 1
        positions = (start + torch.arange(ids.shape[1], device=ids.device)).expand(3, *ids.shape)
        language_model = self.model.language_model
        suffix = language_model(
            inputs_embeds=language_model.get_input_embeddings()(ids),
            attention_mask=torch.cat([ones.expand(len(rests), -1), mask], dim=1),
            position_ids=positions,
            use_cache=False,
            **{cache_keyword(language_model.forward): cache},
        ).last_hidden_state
        return suffix[torch.arange(len(rests), device=ids.device), mask.sum(1) - 1]

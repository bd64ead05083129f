"""Qwen2.5-Omni thinker backbone: prompts, collation, placeholder counts and the real loading path."""

import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2_5OmniConfig

import builders
from lightning_modules.backbones.qwen_omni import (
    AUDIO_TOKEN,
    PromptTemplates,
    QwenOmniThinker,
    audio_token_count,
    tiny_components,
)
from datamodules.inputs import EmbedInput
from lightning_modules.poolers import EmbTokenPooler

RATE = 16000


def wave(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


@pytest.fixture(scope="module")
def backbone():
    return builders.tiny_qwen_backbone().eval()


def test_placeholder_formula_matches_audio_tower(backbone):
    tower = backbone.model
    for frames in [1, 2, 3, 4, 5, 7, 99, 100, 101, 199, 200, 201, 333, 1000]:
        features = torch.randn(1, 20, frames)
        mask = torch.ones(1, frames, dtype=torch.long)
        with torch.no_grad():
            out = tower.get_audio_features(features, mask).last_hidden_state
        assert out.shape[0] == audio_token_count(frames), frames
        assert audio_token_count(frames) == ((frames - 1) // 2 + 1 - 2) // 2 + 1


def test_collator_counts_and_wraps_audio_placeholders(backbone):
    collate = backbone.collator()
    tokenizer = collate.tokenizer
    items = [EmbedInput(audio=wave(1.3)), EmbedInput(audio=wave(0.51, 1), text="a low hum"), EmbedInput(text="x")]
    batch = collate(items)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    frames = [math.ceil(1.3 * RATE / 160), math.ceil(0.51 * RATE / 160)]
    assert batch["feature_attention_mask"].sum(-1).tolist() == frames
    assert batch["input_features"].shape == (2, 20, max(frames))
    counts = (batch["input_ids"] == audio_id).sum(-1).tolist()
    assert counts == [audio_token_count(frames[0]), audio_token_count(frames[1]), 0]
    bos, eos = tokenizer.convert_tokens_to_ids(["<|audio_bos|>", "<|audio_eos|>"])
    for row in batch["input_ids"][:2].tolist():
        first, last = row.index(audio_id), len(row) - 1 - row[::-1].index(audio_id)
        assert row[first - 1] == bos and row[last + 1] == eos
    # left padding (the official processor's default): the last column is real for every row
    assert batch["attention_mask"][:, -1].all()


def test_features_padded_to_longest_equal_official_30s_padding(backbone):
    collate = backbone.collator()
    waves = [wave(2.0), wave(0.7, 1), wave(1.234, 2)]
    features, mask = collate.features(waves)
    official = collate.feature_extractor(
        waves, sampling_rate=RATE, padding="max_length", return_attention_mask=True, return_tensors="pt"
    )
    assert official["input_features"].shape[-1] == 3000
    assert features.shape[-1] == 200
    for i, w in enumerate(waves):
        valid = int(mask[i].sum())
        assert valid == int(official["attention_mask"][i].sum())
        torch.testing.assert_close(features[i, :, :valid], official["input_features"][i, :, :valid])


def test_prompt_matches_aurola_chat_format():
    p = PromptTemplates()
    text = p.render(EmbedInput(text="dogs bark"))
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\ndogs bark\nSummarize above sentence in one word:<|im_end|>\n"
        "<|im_start|>assistant\n<emb>.<|im_end|>\n"
    )
    audio = p.render(EmbedInput(audio=wave(0.1)))
    assert "<|audio_bos|><|AUDIO|><|audio_eos|>Summarize above audio in one word:" in audio
    both = p.render(EmbedInput(audio=wave(0.1), text="dogs"))
    assert "<|audio_eos|>dogs\nSummarize above audio and sentence in one word:" in both
    custom = PromptTemplates(system=None, text="query: {instruction}{text}", assistant="")
    assert custom.render(EmbedInput(text="t", instruction="I: ")).startswith("<|im_start|>user\nquery: I: t<")


def test_emb_pooler_reads_state_before_marker(backbone):
    batch = backbone.collator()([EmbedInput(text="a high beep"), EmbedInput(audio=wave(0.8))])
    with torch.no_grad():
        out = backbone(batch)
    pooled = EmbTokenPooler()(out)
    ids = batch["input_ids"].tolist()
    for b in range(2):
        pos = ids[b].index(backbone.emb_token_id) - 1
        torch.testing.assert_close(pooled[b], out.hidden_states[b, pos])


def test_padded_batch_equals_single_items(backbone):
    items = [EmbedInput(audio=wave(1.5)), EmbedInput(audio=wave(0.6, 3)), EmbedInput(text="two short clicks")]
    collate = backbone.collator()
    with torch.no_grad():
        batched = EmbTokenPooler()(backbone(collate(items)))
        singles = torch.cat([EmbTokenPooler()(backbone(collate([it]))) for it in items])
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=1e-4)


def _save_official_layout(directory: str) -> tuple:
    """Write a tiny thinker as the full Qwen2.5-Omni checkpoints are laid out (``thinker.`` prefix,
    ``thinker.model.`` for the language model, ``thinker.lm_head``, plus talker weights to ignore)."""
    model, tokenizer, feature_extractor = tiny_components(seed=3)
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("language_model.", "model.", 1) if key.startswith("language_model.") else key
        state["thinker." + key] = value.contiguous()
    state["thinker.lm_head.weight"] = model.language_model.embed_tokens.weight.detach().clone()
    state["talker.model.norm.weight"] = torch.ones(4)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    Qwen2_5OmniConfig(thinker_config=model.config.to_dict()).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    feature_extractor.save_pretrained(directory)
    return model, tokenizer, feature_extractor


def test_real_loading_path_reads_full_omni_checkpoint(tmp_path, tiny_qwen_backbone):
    reference, _, _ = _save_official_layout(str(tmp_path))
    loaded = QwenOmniThinker(name_or_path=str(tmp_path)).eval()
    tiny = tiny_qwen_backbone(seed=3).eval()
    items = [EmbedInput(audio=wave(1.1)), EmbedInput(text="a rising chirp then a click")]
    batch_loaded = loaded.collator()(items)
    batch_tiny = tiny.collator()(items)
    assert torch.equal(batch_loaded["input_ids"], batch_tiny["input_ids"])
    for key, value in reference.state_dict().items():
        if key.startswith("visual.") or key == "language_model.embed_tokens.weight":
            continue
        torch.testing.assert_close(loaded.model.state_dict()[key], value, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch_loaded).hidden_states, tiny(batch_tiny).hidden_states)


def test_exactly_one_source_required():
    with pytest.raises(ValueError, match="exactly one"):
        QwenOmniThinker()


def _audio_only_processor(collate):
    """The official ``Qwen2_5OmniProcessor`` over our tokenizer and feature extractor, without torchvision.

    Its image and video processors are never called for audio, but the constructor type-checks them,
    and resolving the video processor's base class needs torchvision (the video mapping is a dummy
    object without it). So the image side is the PIL implementation and the video processor is a
    stand-in holding only the ``merge_size`` that releases before 5.23 read in every ``__call__``:
    the subclass accepts it and leaves every other check and all of ``__call__`` to the official
    class.
    """
    from transformers import Qwen2_5OmniProcessor, Qwen2VLImageProcessorPil

    class NoVideo(SimpleNamespace):
        """Never called for audio; ``merge_size`` as in Qwen2.5-Omni's video processor."""

    class AudioOnlyProcessor(Qwen2_5OmniProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, NoVideo):
                return NoVideo
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = collate.tokenizer
    for name, token in [
        ("audio_token", "<|AUDIO|>"), ("image_token", "<|IMAGE|>"), ("video_token", "<|VIDEO|>"),
        ("audio_bos_token", "<|audio_bos|>"), ("audio_eos_token", "<|audio_eos|>"),
        ("vision_bos_token", "<|vision_bos|>"), ("vision_eos_token", "<|vision_eos|>"),
    ]:  # fmt: skip
        setattr(tokenizer, name, token)
        setattr(tokenizer, name + "_id", tokenizer.convert_tokens_to_ids(token))
    return AudioOnlyProcessor(
        image_processor=Qwen2VLImageProcessorPil(), video_processor=NoVideo(merge_size=2),
        feature_extractor=collate.feature_extractor, tokenizer=tokenizer,
    )  # fmt: skip


def test_parity_with_official_processor(tiny_qwen_backbone):
    # A fresh backbone: the processor sets the special-token attributes it reads on the tokenizer.
    collate = tiny_qwen_backbone().collator()
    processor = _audio_only_processor(collate)
    # Different lengths (one longer than a 2 s chunk), audio with text, and a text-only item among them.
    items = [
        EmbedInput(audio=wave(1.7)), EmbedInput(text="a low hum"), EmbedInput(audio=wave(0.9, 5)),
        EmbedInput(audio=wave(2.6, 7), text="how often does it beep?"),
    ]  # fmt: skip
    audio_items = [it for it in items if it.audio is not None]
    ours = collate(items)
    official = processor(
        text=[collate.prompts.render(it) for it in items], audio=[it.audio for it in audio_items],
        padding=True, return_tensors="pt",
    )
    assert torch.equal(ours["input_ids"], official["input_ids"])
    assert torch.equal(ours["attention_mask"], official["attention_mask"])
    audio_id = collate.tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    rows = [i for i, it in enumerate(items) if it.audio is not None]
    assert int((official["input_ids"][1] == audio_id).sum()) == 0
    for i, row in enumerate(rows):
        valid = int(ours["feature_attention_mask"][i].sum())
        assert valid == int(official["feature_attention_mask"][i].sum())
        # the valid frames became as many placeholders as the audio tower will output
        assert int((official["input_ids"][row] == audio_id).sum()) == audio_token_count(valid)
        torch.testing.assert_close(ours["input_features"][i, :, :valid], official["input_features"][i, :, :valid])

"""MiDashengLM backbone: front end, encoder chunking, checkpoint layout and loading, prompts.

The official-checkpoint facts in ``fixtures/midashenglm_7b_official.json`` come from public sources
named in its ``_sources`` entry: the vLLM and SGLang MiDashengLM ports, config diffs and the model
card on huggingface.co/mispeech, the dasheng-lm fine-tuning toolkit, and a third-party loading log of
``mispeech/midashenglm-7b`` (tensor counts). The total parameter count was not published in a form
we could read (no ``model.safetensors.index.json``), so it is asserted as our own derived number.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lightning_modules.backbones.dasheng import (
    DashengConfig,
    LogMelFrontEnd,
    count_parameters,
    htk_mel_filterbank,
    num_mel_frames,
)
from lightning_modules.backbones.midashenglm import (
    AUDIO_TOKEN,
    IM_END,
    LEGACY_FRONT_END_KEYS,
    CheckpointMismatchError,
    MiDashengLM,
    MiDashengLMBackbone,
    MiDashengLMConfig,
    audio_token_count,
    build_tiny_tokenizer,
)
import builders
from builders import tiny_dasheng_model
from datamodules.inputs import EmbedInput

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "midashenglm_7b_official.json").read_text())
SR = 16000


# ---------------------------------------------------------------- numpy float64 reference front end
def numpy_htk_filterbank(n_freqs: int, n_mels: int, sr: int, f_min: float, f_max: float) -> np.ndarray:
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    bins = np.linspace(0.0, sr / 2, n_freqs)
    edges = to_hz(np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2))
    bank = np.zeros((n_freqs, n_mels))
    for m in range(n_mels):
        low, centre, high = edges[m : m + 3]
        rising = (bins - low) / (centre - low)
        falling = (high - bins) / (high - centre)
        bank[:, m] = np.maximum(0.0, np.minimum(rising, falling))
    return bank


def numpy_log_mel(wave: np.ndarray) -> np.ndarray:
    """Official front end in float64: centred reflect-padded STFT, periodic Hann, HTK mel, dB, top_db."""
    n_fft, hop = 512, 160
    padded = np.pad(wave.astype(np.float64), n_fft // 2, mode="reflect")
    n_frames = 1 + (len(padded) - n_fft) // hop
    frames = padded[np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    mel = power @ numpy_htk_filterbank(n_fft // 2 + 1, 64, SR, 0.0, 8000.0)
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    return np.maximum(db, db.max() - 120.0).T


def test_filterbank_matches_numpy_reference():
    ours = htk_mel_filterbank(257, 0.0, 8000.0, 64, SR).numpy()
    np.testing.assert_allclose(ours, numpy_htk_filterbank(257, 64, SR, 0.0, 8000.0), atol=1e-12)


def test_log_mel_matches_numpy_reference():
    rng = np.random.default_rng(0)
    t = np.arange(12345) / SR
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    wave[8000:] = 0.0  # silence exercises the 120 dB floor
    front_end = LogMelFrontEnd(DashengConfig(patch_size=[64, 4], patch_stride=[64, 4]))
    ours = front_end(torch.from_numpy(wave.astype(np.float32))[None])[0].numpy()
    reference = numpy_log_mel(wave.astype(np.float32))
    assert ours.shape == reference.shape == (64, 1 + 12345 // 160)
    assert reference.min() == pytest.approx(reference.max() - 120.0)
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_log_mel_ignores_bf16_autocast():
    """Under ``bf16-mixed`` the model runs inside autocast, which would compute the filterbank
    product in bfloat16; the front end switches it off: float32 output, the float32 values, for one
    clip and for a padded batch with lengths."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    waves = torch.from_numpy((0.3 * rng.standard_normal((2, 9000))).astype(np.float32))
    lengths = torch.tensor([9000, 5000])
    waves[1, 5000:] = 0.0
    plain = (model.audio_encoder.front_end(waves[:1]), model.audio_encoder.log_mel(waves, lengths))
    with torch.autocast("cpu", torch.bfloat16):
        mixed = (model.audio_encoder.front_end(waves[:1]), model.audio_encoder.log_mel(waves, lengths))
    for got, want in zip(mixed, plain):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- tiny model helpers
def tiny_model(seed: int = 0) -> MiDashengLM:
    return tiny_dasheng_model(seed)


def tiny_backbone(seed: int = 0) -> MiDashengLMBackbone:
    return builders.tiny_dasheng_backbone(manual_seed=seed).eval()


def clip(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)


def encoder_tokens(model: MiDashengLM, wave: np.ndarray) -> torch.Tensor:
    audio = torch.from_numpy(wave)[None]
    states, mask = model.audio_encoder(audio, torch.tensor([wave.size]))
    tokens, _ = model.audio_projector(states, mask)
    return tokens[0]


def official_token_count(num_samples: int) -> int:
    """vLLM's ``calculate_mel_frames_dasheng`` (n_fft 512, hop 160, centred, /4 then /5)."""
    return int(1 + ((num_samples + 512) - 512) / 160) // 4 // 5


# ---------------------------------------------------------------------------------------- tests
LENGTHS = [3200, 4000, 9599, 9600, 15999, 16000, 3 * SR + 77]  # the last one spans 4 chunks


@torch.no_grad()
def test_audio_token_count_matches_encoder_output():
    model = tiny_model()
    config = model.config
    assert 3 * SR + 77 > config.audio_encoder_config.target_length * config.audio_encoder_config.hop_length
    for n in LENGTHS:
        assert encoder_tokens(model, clip(n / SR, n)).shape[0] == audio_token_count(n, config)
        assert audio_token_count(n, config) == official_token_count(n)


@torch.no_grad()
def test_collator_placeholders_equal_encoder_tokens():
    backbone = tiny_backbone()
    items = [EmbedInput(audio=clip(n / SR, n), text="a dog barks") for n in LENGTHS]
    batch = backbone.collator()(items)
    placeholders = (batch["input_ids"] == backbone.config.audio_token_id).sum(dim=1)
    for row, n in enumerate(LENGTHS):
        assert placeholders[row] == encoder_tokens(backbone.model, clip(n / SR, n)).shape[0] > 0


@torch.no_grad()
def test_long_input_is_encoded_as_concatenated_chunks():
    """Reference written out here: each chunk gets positions from 0 and attends only to itself."""
    model = tiny_model()
    encoder = model.audio_encoder
    wave = torch.from_numpy(clip(2.5, 7))[None]  # 2.5 s = 250 frames = 62 tokens > 24 per chunk
    ours, _ = encoder(wave)

    mel = encoder.front_end(wave)
    bn = encoder.init_bn
    normed = (mel - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
    normed = normed * bn.weight[:, None] + bn.bias[:, None]
    patches = encoder.patch_embed.proj(normed[:, None])  # (1, D, 1, P)
    step = encoder.config.target_length // 4
    chunks = []
    for start in range(0, patches.shape[-1], step):
        x = patches[..., start : start + step]
        x = (x + encoder.time_pos_embed[..., : x.shape[-1]] + encoder.freq_pos_embed)[0, :, 0].T
        for block in encoder.blocks:
            h = block.norm1(x)
            q, k, v = block.attn.qkv(h).view(h.shape[0], 3, 4, -1).permute(1, 2, 0, 3)
            attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
            x = x + block.attn.proj(attn.transpose(0, 1).reshape(h.shape))
            x = x + block.mlp(block.norm2(x))
        chunks.append(encoder.norm(x))
    reference = torch.cat(chunks)
    assert len(chunks) == 3 and reference.shape == ours[0].shape
    torch.testing.assert_close(ours[0], reference, atol=1e-5, rtol=1e-5)


def test_batched_front_end_equals_each_clip_alone():
    """One STFT for the padded batch gives each clip the frames it gets alone (its own end
    reflected, its own 120 dB floor), zeros past its end, whatever the padding holds."""
    front_end = tiny_model().audio_encoder.front_end
    lengths = [12345, 3200, 8001, 8000]
    waves = torch.full((len(lengths), max(lengths)), 5.0)  # padding that must not leak in
    for row, length in enumerate(lengths):
        waves[row, :length] = torch.from_numpy(clip(1.0, row)[:length])
    batched = front_end(waves, torch.tensor(lengths))
    for row, length in enumerate(lengths):
        alone = front_end(waves[row : row + 1, :length])[0]
        assert alone.shape[-1] == num_mel_frames(length, MiDashengLMConfig.tiny().audio_encoder_config)
        torch.testing.assert_close(batched[row, :, : alone.shape[-1]], alone, rtol=0, atol=1e-5)
        assert not batched[row, :, alone.shape[-1]:].any()


def test_audio_tokens_replace_the_placeholders_in_order():
    """The k-th placeholder gets the k-th real audio token (boolean selection and masked_scatter as
    the reference), with clips of different token counts and a text-only row between them."""
    from lightning_modules.backbones.midashenglm import _place_audio_tokens

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 4, generator=g)
    counts = torch.tensor([2, 5, 1])
    placeholders = torch.zeros(4, 9, dtype=torch.bool)
    placeholders[0, 3:5] = True  # clip 0
    placeholders[2, 1:6] = True  # clip 1 (row 1 is text only)
    placeholders[3, 7] = True  # clip 2
    embeds = torch.randn(4, 9, 4, generator=g)
    real = torch.arange(5)[None, :] < counts[:, None]
    reference = embeds.masked_scatter(placeholders.unsqueeze(-1), tokens[real])
    assert torch.equal(_place_audio_tokens(embeds, placeholders, tokens, counts), reference)


def test_collator_refuses_placeholder_tokens_in_text():
    collate = tiny_backbone().collator()
    with pytest.raises(ValueError, match=r"holds 1 <\|AUDIO\|> tokens where its audio gives 0"):
        collate([EmbedInput(text="a caption with <|AUDIO|> inside")])


@torch.no_grad()
def test_padded_batch_matches_single_items():
    backbone = tiny_backbone()
    collate = backbone.collator()
    items = [
        EmbedInput(audio=clip(0.4, 1), instruction="Represent the user's input."),
        EmbedInput(text="rain falls on the roof", instruction="Represent the user's input."),
        EmbedInput(audio=clip(2.3, 2), text="what is happening", instruction="Retrieve the answer."),
        EmbedInput(audio=clip(0.1, 3)),  # shorter than the 0.2 s minimum
    ]
    together = backbone(collate(items))
    for row, item in enumerate(items):
        alone = backbone(collate([item]))
        length = int(alone.attention_mask.sum())
        assert int(together.attention_mask[row].sum()) == length
        torch.testing.assert_close(
            together.hidden_states[row, :length], alone.hidden_states[0, :length], atol=1e-5, rtol=1e-4
        )


def write_official_checkpoint(model: MiDashengLM, directory: Path, num_shards: int = 3) -> dict:
    """Official layout: config.json, sharded safetensors, index json, legacy front-end buffers."""
    config = model.config
    state = {key: t.detach().clone().contiguous() for key, t in model.state_dict().items()}
    encoder = config.audio_encoder_config
    state[LEGACY_FRONT_END_KEYS[0]] = htk_mel_filterbank(257, 0.0, 8000.0, 64, SR).float()
    state[LEGACY_FRONT_END_KEYS[1]] = torch.hann_window(encoder.win_length)
    keys = sorted(state)
    weight_map = {}
    for shard in range(num_shards):
        name = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {key: state[key] for key in keys[shard::num_shards]}
        save_file(part, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    official_config = {
        "architectures": ["MiDashengLMModel"],
        "model_type": "midashenglm",
        "audio_encoder_config": {**asdict(encoder), "model_type": "midashenglm_dasheng_encoder"},
        "subsample_factor": config.subsample_factor,
        "text_config": config.text_config.to_dict(),
        "audio_token_id": config.audio_token_id,
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(official_config))
    build_tiny_tokenizer().save_pretrained(directory)
    return state


@torch.no_grad()
def test_reload_official_layout_gives_identical_outputs(tmp_path):
    original = tiny_backbone(seed=3)
    write_official_checkpoint(original.model, tmp_path)
    reloaded = MiDashengLMBackbone(name_or_path=str(tmp_path)).eval()
    items = [
        EmbedInput(audio=clip(1.7, 5), text="a bird chirps", instruction="Represent the user's input."),
        EmbedInput(text="piano music plays"),
    ]
    batch = original.collator()(items)
    assert torch.equal(batch["input_ids"], reloaded.collator()(items)["input_ids"])
    torch.testing.assert_close(reloaded(batch).hidden_states, original(batch).hidden_states, rtol=0, atol=0)
    loaded_state = reloaded.model.state_dict()
    for key, tensor in original.model.state_dict().items():
        assert torch.equal(loaded_state[key], tensor), key


def test_loader_lists_missing_and_unexpected_keys(tmp_path):
    model = tiny_model()
    state = write_official_checkpoint(model, tmp_path, num_shards=1)
    shard = tmp_path / "model-00001-of-00001.safetensors"
    dropped = ["audio_projector.net.2.bias", "decoder.model.layers.1.self_attn.k_proj.weight"]
    for key in dropped:
        del state[key]
    state["decoder.model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    state["audio_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    save_file(state, str(shard))
    index = {"metadata": {}, "weight_map": dict.fromkeys(state, shard.name)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointMismatchError) as error:
        MiDashengLM.from_pretrained(tmp_path)
    message = str(error.value)
    for key in [*dropped, "decoder.model.layers.7.mlp.up_proj.weight", "audio_encoder.blocks.0.attn.qkv.weight"]:
        assert key in message
    assert error.value.missing == sorted(dropped)
    assert error.value.unexpected == ["decoder.model.layers.7.mlp.up_proj.weight"]


def test_checkpoint_key_layout_and_shape_relations():
    model = tiny_model()
    state = model.state_dict()
    assert {key.split(".")[0] for key in state} == {"audio_encoder", "audio_projector", "decoder"}
    patterns = [re.compile(p) for p in FIXTURE["key_patterns"]]
    for key in state:
        assert any(p.match(key) for p in patterns) or key.endswith("num_batches_tracked"), key
    for pattern in patterns:
        assert any(pattern.match(key) for key in state), pattern.pattern
    encoder, text = model.config.audio_encoder_config, model.config.text_config
    k = model.config.subsample_factor
    assert state["audio_projector.net.0.weight"].shape == (text.hidden_size, k * encoder.embed_dim)
    assert state["audio_projector.net.2.weight"].shape == (text.hidden_size, text.hidden_size)
    assert state["audio_encoder.patch_embed.proj.weight"].shape == (encoder.embed_dim, 1, 64, 4)
    assert state["audio_encoder.time_pos_embed"].shape == (1, encoder.embed_dim, 1, encoder.target_length // 4)
    assert state["audio_encoder.freq_pos_embed"].shape == (1, encoder.embed_dim, 1, 1)
    assert state["audio_encoder.blocks.0.attn.qkv.weight"].shape == (3 * encoder.embed_dim, encoder.embed_dim)
    assert state["decoder.lm_head.weight"].shape == (text.vocab_size, text.hidden_size)


def test_7b_on_meta_matches_published_config_and_tensor_counts():
    config = MiDashengLMConfig.midashenglm_7b()
    expected = FIXTURE["config"]
    for name, value in expected["audio_encoder_config"].items():
        assert getattr(config.audio_encoder_config, name) == value, name
    for name, value in expected["text_config"].items():
        assert getattr(config.text_config, name) == value, name
    assert config.subsample_factor == expected["subsample_factor"]
    assert config.audio_token_id == expected["audio_token_id"]

    with torch.device("meta"):
        model = MiDashengLM(config)
    keys = list(model.state_dict()) + FIXTURE["legacy_front_end_keys"]
    counts = FIXTURE["checkpoint_tensor_counts"]
    assert len(keys) == counts["total"]
    for prefix in ("audio_encoder", "audio_projector", "decoder"):
        assert sum(key.startswith(prefix + ".") for key in keys) == counts[prefix], prefix

    parameters = count_parameters(model)
    # Our count: 630,333,568 (encoder) + 35,789,824 (projector) + 7,615,616,512 (decoder incl. lm_head).
    assert parameters == 8_281_739_904
    assert count_parameters(model.decoder.model) == 7_070_619_136
    # Published: 7 float32 shards of about 33 GB in total.
    assert abs(4 * parameters / 1e9 - FIXTURE["fp32_checkpoint"]["approx_total_gb"]) < 1.0


def test_only_decoder_can_train_and_audio_path_stays_in_eval(tiny_dasheng_backbone):
    backbone = tiny_backbone()
    backbone.train()
    assert backbone.training and backbone.language_model.training
    assert not backbone.audio_encoder.training and not backbone.model.audio_projector.training
    trainable = {name.split(".")[1] for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"decoder"}
    assert backbone.language_model is backbone.model.decoder.model
    assert not any(p.requires_grad for p in backbone.audio_encoder.parameters())

    batch = backbone.collator()([EmbedInput(audio=clip(1.0, 4), text="a car engine idles")])
    stats = backbone.audio_encoder.init_bn.running_mean.clone()
    backbone(batch).hidden_states.sum().backward()
    assert torch.equal(stats, backbone.audio_encoder.init_bn.running_mean)
    assert backbone.language_model.layers[0].self_attn.q_proj.weight.grad is not None

    unfrozen = tiny_dasheng_backbone(freeze_audio_encoder=False).train()
    assert unfrozen.audio_encoder.training
    assert all(p.requires_grad for p in unfrozen.audio_encoder.parameters())


def test_prompt_format_final_token_and_pickling():
    backbone = tiny_backbone()
    collate = pickle.loads(pickle.dumps(backbone.collator()))
    items = [
        EmbedInput(audio=clip(0.5, 9), text="what sound is this", instruction="Retrieve the answer."),
        EmbedInput(text="a dog barks"),
        EmbedInput(audio=clip(0.3, 8)),
    ]
    batch = collate(items)
    tokenizer = backbone.tokenizer
    last = batch["attention_mask"].sum(dim=1) - 1
    end_id = tokenizer.convert_tokens_to_ids(IM_END)
    assert (batch["input_ids"][torch.arange(3), last] == end_id).all()
    first = tokenizer.decode(batch["input_ids"][0, : last[0] + 1])
    n = audio_token_count(8000, backbone.config)
    assert first == (
        "<|im_start|>system\nYou are a helpful language and speech assistant.<|im_end|>\n"
        "<|im_start|>user\nRetrieve the answer.\n<|audio_bos|>" + AUDIO_TOKEN * n + "<|audio_eos|>\n"
        "what sound is this<|im_end|>"
    )
    assert tokenizer.decode(batch["input_ids"][1, : last[1] + 1]).endswith("<|im_start|>user\na dog barks<|im_end|>")
    assert batch["audio"].shape == (2, 8000) and batch["audio_lengths"].tolist() == [8000, 4800]


@torch.no_grad()
def test_text_only_batch_has_no_audio_and_bfloat16_runs(tiny_dasheng_backbone):
    backbone = tiny_backbone()
    batch = backbone.collator()([EmbedInput(text="a dog barks"), EmbedInput(text="music plays")])
    assert set(batch) == {"input_ids", "attention_mask"}
    assert backbone(batch).hidden_states.shape[-1] == backbone.hidden_size == 32

    half = tiny_dasheng_backbone(dtype="bfloat16").eval()
    out = half(half.collator()([EmbedInput(audio=clip(1.2, 1), text="rain")]))
    assert out.hidden_states.dtype == torch.bfloat16 and torch.isfinite(out.hidden_states.float()).all()


def test_constructor_rejects_ambiguous_sources():
    with pytest.raises(ValueError):
        MiDashengLMBackbone()
    with pytest.raises(ValueError):
        MiDashengLMBackbone(name_or_path="somewhere", tiny=True)
    with pytest.raises(ValueError):
        MiDashengLMBackbone(tiny=True, trust_remote_code=True)


def test_encoder_config_defaults_are_the_published_ones_and_valid():
    # DashengConfig() and a checkpoint config without audio_encoder_config must build (the defaults
    # once copied the generic Dasheng patches, 16x16 / 1012 frames, which MiDashengLM rejects).
    published = MiDashengLMConfig.midashenglm_7b().audio_encoder_config
    default = DashengConfig()
    assert (default.patch_size, default.patch_stride, default.target_length) == (
        published.patch_size, published.patch_stride, published.target_length) == ([64, 4], [64, 4], 1008)
    assert DashengConfig.from_dict({}) == default
    values = MiDashengLMConfig.tiny().to_dict()
    del values["audio_encoder_config"]
    assert MiDashengLMConfig.from_dict(values).audio_encoder_config == default
    with pytest.raises(ValueError, match="spanning all 64 mel bins"):
        DashengConfig(patch_size=[16, 16], patch_stride=[16, 16])

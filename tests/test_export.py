"""Export → ``EmbeddingModel.from_pretrained`` restores the embeddings; ``encode`` equals ``module.embed``."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import builders
from datamodules.audio import load_audio
from lightning_modules import (
    EmbeddingModule,
    EmbTokenPooler,
    LastTokenPooler,
    LinearHead,
    ModalityHeads,
    PromptTemplates,
)
from lightning_modules.adapters import LoraSettings
from lightning_modules.tools.encoder import EmbeddingModel
from lightning_modules.tools.export import CONFIG_NAME, export_model
from datamodules.inputs import EmbedInput
from losses.infonce import InfoNCE

RNG = np.random.default_rng(0)
AUDIO = [(0.1 * RNG.standard_normal(n)).astype(np.float32) for n in (16000, 9000, 12000)]
TEXT = ["a dog barks twice", "a high beep", "rain on a tin roof"]
INPUTS = {"text": dict(text=TEXT), "audio": dict(audio=AUDIO), "audio_text": dict(audio=AUDIO, text=TEXT)}


def perturb_lora(backbone):
    """LoRA B starts at zero; give the adapter a real effect so the tests can see it."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))


def encode_all(model):
    return {name: model.encode(**kwargs, batch_size=2) for name, kwargs in INPUTS.items()}


@pytest.fixture(scope="module")
def qwen_lora():
    backbone = builders.tiny_qwen_backbone(seed=3, prompts=PromptTemplates(system=None), lora=LoraSettings(r=4))
    perturb_lora(backbone)
    module = EmbeddingModule(backbone, EmbTokenPooler(), LinearHead(16), InfoNCE(temperature=0.07))
    return module.eval()


def test_components_record_their_arguments(qwen_lora):
    args = qwen_lora.backbone.init_args
    assert args["tiny"] is True and args["seed"] == 3 and args["lora"].r == 4
    assert args["prompts"].system is None and args["dtype"] == "float32"  # defaults filled in
    assert qwen_lora.head.init_args == {"out_features": 16, "bias": True}
    assert qwen_lora.pooler.init_args == {}


def test_qwen_lora_export_is_bit_identical(qwen_lora, tmp_path):
    export_model(qwen_lora, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        CONFIG_NAME, "model.safetensors", "adapter_config.json", "adapter_model.safetensors"
    }
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["temperature"] == pytest.approx(0.07)
    assert config["embedding_dim"] == 16 and config["normalize"] is True
    assert config["backbone"]["init_args"]["lora"]["init_args"]["r"] == 4
    adapter = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4

    expected = encode_all(EmbeddingModel.from_module(qwen_lora))
    loaded = EmbeddingModel.from_pretrained(tmp_path)
    assert loaded.temperature == pytest.approx(0.07)
    for name, embeddings in encode_all(loaded).items():
        assert torch.equal(embeddings, expected[name]), name


def test_adapter_loads_with_peft(qwen_lora, tmp_path, tiny_qwen_backbone):
    """The adapter files are peft's own format: PeftModel.from_pretrained reads them."""
    from peft import PeftModel

    export_model(qwen_lora, tmp_path)
    plain = tiny_qwen_backbone(seed=3, prompts=PromptTemplates(system=None))
    peft_model = PeftModel.from_pretrained(plain.language_model, str(tmp_path))
    lm = qwen_lora.backbone.language_model
    ours = {n.replace(".default", ""): p for n, p in lm.named_parameters() if "lora_" in n}
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p
              for n, p in peft_model.named_parameters() if "lora_" in n}
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for name, param in ours.items():
        assert torch.equal(param, theirs[name]), name


def test_qwen_merged_export(qwen_lora, tmp_path):
    export_model(qwen_lora, tmp_path, merge_lora=True)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_NAME, "model.safetensors"}
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["backbone"]["init_args"]["lora"] is None
    assert config["weights"]["language_model_merged"] is True
    expected = encode_all(EmbeddingModel.from_module(qwen_lora))
    loaded = EmbeddingModel.from_pretrained(tmp_path)
    assert not any("lora_" in name for name, _ in loaded.named_parameters())
    for name, embeddings in encode_all(loaded).items():
        torch.testing.assert_close(embeddings, expected[name], atol=1e-6, rtol=0, msg=name)
    # Exporting did not merge into the live model.
    assert any("lora_" in name for name, _ in qwen_lora.named_parameters())
    assert not any(getattr(m, "merged", False) for m in qwen_lora.modules())


def test_merge_needs_lora(tmp_path, tiny_module):
    with pytest.raises(ValueError, match="no LoRA"):
        export_model(tiny_module(), tmp_path, merge_lora=True)


def test_midashenglm_lora_export(tmp_path, tiny_dasheng_backbone):
    backbone = tiny_dasheng_backbone(manual_seed=0, lora=LoraSettings(r=4), system_prompt=None)
    perturb_lora(backbone)
    module = EmbeddingModule(backbone, LastTokenPooler(), ModalityHeads(8)).eval()
    export_model(module, tmp_path)
    expected = encode_all(EmbeddingModel.from_module(module))
    # The tiny model draws its weights from the global RNG: a different state must not matter,
    # because the export carries the base weights.
    torch.manual_seed(123)
    loaded = EmbeddingModel.from_pretrained(tmp_path)
    for name, embeddings in encode_all(loaded).items():
        assert torch.equal(embeddings, expected[name]), name


def test_encode_matches_module_embed(qwen_lora):
    model = EmbeddingModel.from_module(qwen_lora)
    collate = qwen_lora.backbone.collator()
    instruction = "Represent the user's input."
    cases = {
        "text": [EmbedInput(text=t, instruction=instruction) for t in TEXT],
        "audio": [EmbedInput(audio=a, instruction=instruction) for a in AUDIO],
        "audio_text": [EmbedInput(audio=a, text=t, instruction=instruction) for a, t in zip(AUDIO, TEXT)],
    }
    with torch.no_grad():
        for modality, items in cases.items():
            expected = qwen_lora.embed(collate(items), modality)
            got = model.encode(**INPUTS[modality], instruction=instruction, batch_size=len(items))
            assert torch.equal(got, expected), modality
    unnormalised = model.encode(text=TEXT, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(unnormalised, dim=-1), model.encode(text=TEXT))
    assert not torch.allclose(unnormalised.norm(dim=-1), torch.ones(len(TEXT)))


def test_encode_reads_files_and_crops(qwen_lora, tmp_path):
    model = EmbeddingModel.from_module(qwen_lora)
    path = tmp_path / "clip.wav"
    sf.write(path, (0.1 * RNG.standard_normal(8000 * 3)).astype(np.float32), 8000)  # 3 s at 8 kHz
    wave = load_audio(str(path), model.sampling_rate)
    from_file = model.encode(audio=[path], max_seconds=2.0)
    assert torch.equal(from_file, model.encode(audio=[wave[: 2 * model.sampling_rate]], max_seconds=None))
    raw = (0.1 * RNG.standard_normal(8000)).astype(np.float32)
    assert torch.equal(
        model.encode(audio=[raw], sampling_rate=8000),
        model.encode(audio=[load_audio_like(raw, 8000, model.sampling_rate)]),
    )
    with pytest.raises(ValueError, match="pairwise"):
        model.encode(audio=AUDIO, text=TEXT[:2])


def load_audio_like(wave, rate, target):
    import soxr

    return soxr.resample(wave, rate, target, quality="HQ").astype(np.float32)

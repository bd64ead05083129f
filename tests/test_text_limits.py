"""Token limits on texts and prompts (issue 17: one 60,000-character caption killed training).

Every text side (caption, question with its choices, instruction, hard-negative query) is cut to the
backbone's ``max_text_tokens``; the cut inputs are counted and reported like skipped samples; a
prompt over ``max_prompt_tokens`` stops with the row's ``manifest:line`` and clip id; ``check-data``
warns about the texts over the limit.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch

from builders import tiny_backbone
from callbacks import SkippedSampleReport
from datamodules.audio import AudioPolicy
from datamodules.check import main as check_data
from datamodules.datasets import EvalDataset
from datamodules.manifest import read_jsonl
from datamodules.synthetic import make_synthetic_dataset
from datamodules.text_limits import PromptTooLongError
from lightning_modules.backbones.midashenglm import MiDashengLMBackbone
from lightning_modules.backbones.qwen_omni import QwenOmniThinker
from datamodules.collate import PairCollator
from datamodules.inputs import EmbedInput

REPO = Path(__file__).resolve().parents[1]
RATE = 16_000
#: 60,000 characters of ordinary prose, with accents and CJK so that byte-level tokens split characters.
LONG_CAPTION = ("A dog barks while a café door creaks open; rain (雨) falls on a tin roof, then stops. " * 800)[:60_000]


@pytest.fixture(scope="module", params=["qwen_omni", "midashenglm"])
def backbone(request):
    return tiny_backbone("qwen" if request.param == "qwen_omni" else "midashenglm")


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_long_text_keeps_its_first_480_tokens(backbone):
    collate = backbone.collator()
    full = token_ids(collate.tokenizer, LONG_CAPTION)
    assert len(full) > 10_000
    short = EmbedInput(text="a short caption", instruction="Represent the user's input.")
    items = [EmbedInput(text=LONG_CAPTION), short, EmbedInput(text="a dog", instruction=LONG_CAPTION)]
    cut, count = collate.truncate(items)
    assert count == 2
    assert cut[1] == short and items[0].text == LONG_CAPTION  # short inputs untouched, the given ones unchanged
    for text in (cut[0].text, cut[2].instruction):
        assert LONG_CAPTION.startswith(text)
        ids = token_ids(collate.tokenizer, text)
        assert 478 <= len(ids) <= 480
        assert ids[:-1] == full[: len(ids) - 1]  # the tokens of the whole text, up to the cut
    assert cut[2].text == "a dog"
    again, none_cut = collate.truncate(cut)
    assert none_cut == 0 and again == cut


def test_every_side_of_a_pair_is_cut_and_counted(backbone):
    """Caption (document), question with choices (query text) and instruction, as the datasets
    build them; the prompts stay within the limit plus the template."""
    collate = PairCollator(backbone.collator())
    wave = np.zeros(RATE, dtype=np.float32)
    examples = [
        {"query": EmbedInput(audio=wave, text=f"{LONG_CAPTION}\nChoices: a; b"), "clip_index": 0, "clip_id": "qa",
         "documents": [EmbedInput(text="a", instruction=LONG_CAPTION)]},
        {"query": EmbedInput(audio=wave, text="Which sound comes first?"), "clip_index": 1, "clip_id": "b",
         "documents": [EmbedInput(text=LONG_CAPTION)]},
    ]  # fmt: skip
    batch = collate(examples)
    assert batch["truncated"] == {"query": 1, "document": 2}
    assert LONG_CAPTION.startswith(batch["texts"][1]) and len(batch["texts"][1]) < 5_000
    template = backbone.collator()([EmbedInput(text="")])["attention_mask"].sum()
    assert batch["document"]["attention_mask"].sum(-1).max() <= 2 * 480 + template
    untruncated = backbone.collator()([EmbedInput(text="Which sound comes first?", audio=wave)])
    assert batch["query"]["attention_mask"][1].sum() == untruncated["attention_mask"][0].sum()


def test_a_prompt_over_the_limit_names_the_row(tmp_path, tiny_qwen_backbone):
    """Long audio (30 s: 750 audio tokens on the Qwen thinker) with a long question; the error comes
    from the collator, before the model sees anything."""
    seconds = {"short": 1.0, "long": 30.0}
    rows = []
    for name, length in seconds.items():
        sf.write(tmp_path / f"{name}.wav", np.zeros(int(length * RATE), dtype=np.float32), RATE)
        rows.append({"id": name, "audio": f"{name}.wav", "question": "What is heard? " * 40, "answer": "rain"})
    manifest = tmp_path / "qa.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = EvalDataset(read_jsonl(str(manifest)), RATE, AudioPolicy(30.0))
    collate = PairCollator(tiny_qwen_backbone(max_prompt_tokens=700).collator())
    collate([dataset[0]])  # the short clip fits
    with pytest.raises(PromptTooLongError, match=rf"{manifest}:2 \(clip 'long'\), query side: prompt of \d+ tokens "
                       "exceeds max_prompt_tokens=700") as info:  # fmt: skip
        collate([dataset[0], dataset[1]])
    assert info.value.index == 1 and info.value.tokens > 750


def test_limits_are_checked(tiny_qwen_backbone):
    with pytest.raises(ValueError, match="max_text_tokens must be >= 1 or null"):
        QwenOmniThinker(tiny=True, max_text_tokens=0)
    with pytest.raises(ValueError, match="max_prompt_tokens must be >= 1 or null"):
        MiDashengLMBackbone(tiny=True, max_prompt_tokens=-1)
    collate = tiny_qwen_backbone(max_text_tokens=None, max_prompt_tokens=None).collator()
    assert collate.truncate([EmbedInput(text=LONG_CAPTION)])[1] == 0


def _long_caption_corpus(root: Path) -> Path:
    """8 synthetic clips as a JSONL manifest, the third with a 60,000-character caption."""
    paths = make_synthetic_dataset(str(root / "synthetic"), num_train=8, num_val=4, num_test=4, num_hard_pairs=0)
    folder = Path(paths["train"]).parent
    rows = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
    rows[2]["caption"] = [LONG_CAPTION]
    manifest = root / "long.jsonl"
    manifest.write_text("".join(json.dumps({**row, "audio": str(folder / row["audio"])}) + "\n" for row in rows))
    return manifest


def test_a_60000_character_caption_trains_in_bounded_memory(tmp_path):
    """The demo model, ``fit --trainer.fast_dev_run 2`` on 8 clips of which one has a 60,000-character
    caption. Without the limits the first step asks for an 18 GB attention buffer (the machine that
    found it was killed at 24 GB); the process runs here with its data segment capped at 4 GB, so that
    the failure is an allocation error, not a machine out of memory. With the limits the run completes,
    reports the cut captions, and peaks far below that."""
    manifest = _long_caption_corpus(tmp_path)
    command = [sys.executable, str(REPO / "main.py"), "fit", "--config", str(REPO / "configs" / "demo.yaml"),
               "--data", "RetrievalDataModule", "--data.init_args.train_manifest", str(manifest),
               "--data.init_args.val_manifest", str(manifest), "--data.init_args.batch_size", "4",
               "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false",
               "--trainer.default_root_dir", str(tmp_path / "run"), "--min_free_gb", "0"]  # fmt: skip
    cap = 4 * 2**30

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=limit_memory)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    out = (tmp_path / "log.txt").read_text()
    assert process.returncode == 0, out[-4000:]
    peak_bytes = usage.ru_maxrss * 1024  # kilobytes on Linux
    assert peak_bytes < 1.5 * 2**30, f"peak RSS {peak_bytes / 2**30:.2f} GB"
    assert "truncated texts (train, epoch 0): 0 query-side and 1 document-side inputs" in out
    assert "truncated texts (val, epoch 0): 0 query-side and 1 document-side inputs" in out


class Truncating(pl.LightningModule):
    """A model-less module whose every batch reports 2 document-side inputs cut."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def train_dataloader(self):
        batches = [{"x": torch.ones(1), "skipped": {}, "truncated": {"query": 0, "document": 2}}] * 3
        return torch.utils.data.DataLoader(batches, batch_size=None)

    def training_step(self, batch, batch_idx):
        return (self.weight * batch["x"]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_report_logs_the_truncated_inputs(tmp_path, capsys):
    report = SkippedSampleReport()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[report],
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(Truncating())
    metrics = trainer.callback_metrics
    assert metrics["data/truncated/train/document"] == 6 and metrics["data/truncated/train/query"] == 0
    assert metrics["data/truncated/train/total"] == 6
    assert report.last_truncated["train"] == {"query": 0, "document": 6}
    assert "truncated texts (train, epoch 0): 0 query-side and 6 document-side inputs" in capsys.readouterr().out


def test_check_data_warns_about_texts_over_the_limit(tmp_path, capsys, tiny_qwen_backbone):
    """Counted with the backbone's tokenizer, here the tiny thinker's saved to a directory (as a real
    checkpoint ships it) and named with ``--tokenizer``; without it a tiny backbone's texts are not
    counted, and the report says so."""
    manifest = _long_caption_corpus(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({
        "model": {"backbone": {"class_path": "QwenOmniThinker", "init_args": {"tiny": True, "max_text_tokens": 400}}},
        "data": {"class_path": "RetrievalDataModule", "init_args": {"train_manifest": str(manifest)}},
    }))  # fmt: skip
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer = tiny_qwen_backbone().collator().tokenizer
    tokenizer.save_pretrained(tokenizer_dir)
    tokens = len(token_ids(tokenizer, LONG_CAPTION))

    assert check_data(["--config", str(config), "--tokenizer", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "warnings: 1 texts longer than max_text_tokens=400 (valid; cut to it when embedded)" in out
    assert f"{manifest}:3  long_text  caption  {tokens} tokens" in out
    assert out.rstrip().endswith("result: no problems")

    assert check_data(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "long_text" not in out and "text lengths not checked: the backbone is tiny" in out

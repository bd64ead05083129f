"""Checkpoint contents and loading, ``trust_remote_code``, and the output-folder check before fit.

Checkpoints hold the trainable weights, buffers, optimiser, scheduler, loop and random states, not
the frozen base weights; they load with ``torch.load(weights_only=True)``; a checkpoint that lacks a
trainable weight is refused by name. An unwritable output folder or a full disk stops ``fit``
before its first step, naming the folder.
"""

import logging
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from torch.utils.data import DataLoader

from callbacks import NonFiniteGuard, RngStateCheckpoint
from callbacks.output_dirs import OutputDirectoryError, check_output_dirs, output_dirs
from dist_scripts.resume_run import reference_run
from dist_scripts.train_tiny import examples, make_module
from lightning_modules import EmbeddingModule, LinearHead, LoraSettings, MiDashengLMBackbone
from lightning_modules.adapters import add_lora
from lightning_modules.backbones.midashenglm import MiDashengLM, MiDashengLMConfig
from lightning_modules.tools.encoder import load_embedding_module
from lightning_modules.weights import checkpoint_keys, estimated_checkpoint_bytes, trainable_state_dict
from losses import InfoNCE
from main import main

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def fit_two_steps(tmp_path: Path) -> tuple[EmbeddingModule, Trainer, Path]:
    module = make_module()
    items = examples()
    loader = DataLoader([module.collate(items[i : i + 2]) for i in (0, 2)], batch_size=None)
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[NonFiniteGuard(), RngStateCheckpoint()])
    trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return module, trainer, path


def test_checkpoint_holds_trainable_weights_and_training_state_only(tmp_path):
    module, _, path = fit_two_steps(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    assert trainable and frozen and any("lora_A" in name for name in trainable)
    assert trainable <= checkpoint["state_dict"].keys() <= checkpoint_keys(module)
    assert not frozen & checkpoint["state_dict"].keys()
    (optimizer,) = checkpoint["optimizer_states"]
    assert len(optimizer["state"]) == len(trainable)
    assert all({"exp_avg", "exp_avg_sq", "step"} <= state.keys() for state in optimizer["state"].values())
    assert checkpoint["lr_schedulers"] and checkpoint["loops"]["fit_loop"]
    assert len(checkpoint["rng_states"]) == 1
    assert checkpoint["callbacks"][NonFiniteGuard().state_key] == {"skipped": 0}
    # The estimate the output-folder check uses is the file's size, overhead aside.
    assert estimated_checkpoint_bytes(module) <= path.stat().st_size < estimated_checkpoint_bytes(module) + 200_000


def test_a_checkpoint_without_a_trainable_weight_is_refused_by_name(tmp_path):
    module, trainer, path = fit_two_steps(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    missing = next(name for name in checkpoint["state_dict"] if "lora_A" in name)
    del checkpoint["state_dict"][missing]
    torch.save(checkpoint, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match=re.escape(f"missing trainable weights ['{missing}']")):
        trainer.fit(make_module(), train_dataloaders=DataLoader([]), ckpt_path=tmp_path / "partial.ckpt")

    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["head.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=re.escape("unknown keys ['head.extra']")):
        make_module().on_load_checkpoint(checkpoint)


def test_cli_checkpoints_load_with_weights_only_and_rebuild_the_model(tmp_path_factory):
    """A ``main.py fit`` checkpoint (tiny ALM2Vec, 8 steps): CLI hyper-parameters and random states
    are plain values; the frozen weights come back from the config and seed."""
    run = reference_run(tmp_path_factory, "plain")
    last = run / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 8
    module = load_embedding_module(last)  # torch.load(weights_only=True) inside
    trained = torch.load(run / "weights.pt")
    loaded = trainable_state_dict(module)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[name], trained[name]) for name in trained)


def test_7b_recipe_checkpoint_size_is_the_one_in_the_readme():
    """configs/alm2vec.yaml: MiDashengLM 7B (built on the meta device), LoRA r=16 on q/k/v, a linear
    head to 1024 dimensions and a learnable τ; AdamW keeps two float32 moments per weight."""
    config = MiDashengLMConfig.midashenglm_7b()
    with torch.device("meta"):
        model = MiDashengLM(config).requires_grad_(False)
        add_lora(model.decoder.model, LoraSettings(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj"]))
        head = LinearHead(1024)
        head.build(config.text_config.hidden_size)
        parts = torch.nn.ModuleList([model, head, InfoNCE(learnable_temperature=True)])
    trainable = sum(p.numel() for p in parts.parameters() if p.requires_grad)
    assert trainable == 10_552_321  # LoRA 6,881,280 + head 3,671,040 + τ
    size_mb = estimated_checkpoint_bytes(parts) / 1e6
    assert f"{trainable:,}" in README and f"{size_mb:.0f} MB" in README


def test_trust_remote_code_is_off_by_default_and_logged_when_on(tmp_path, caplog):
    assert not any("trust_remote_code: true" in path.read_text() for path in (REPO / "configs").rglob("*.yaml"))
    with caplog.at_level(logging.WARNING), pytest.raises((OSError, ValueError)):
        # An empty local folder: transformers fails to find a config without going to the network.
        MiDashengLMBackbone(name_or_path=str(tmp_path), trust_remote_code=True)
    assert f"trust_remote_code=True: running the modeling code that comes with {tmp_path}" in caplog.text


def demo_fit(root: Path, monkeypatch) -> None:
    """``main.py fit`` of the demo into ``root``, failing loudly if a training step ever starts."""

    def no_training(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(EmbeddingModule, "training_step", no_training)
    main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--trainer.default_root_dir", str(root),
          "--data.init_args.root", str(root.parent / "synthetic"), "--trainer.enable_progress_bar", "false"])


def test_unwritable_output_folder_stops_fit_before_training(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("a file, so no folder can be made under it")  # root ignores chmod
    with pytest.raises(OutputDirectoryError, match=f"output directory {tmp_path / 'afile' / 'out'}.* is not writable"):
        demo_fit(tmp_path / "afile" / "out", monkeypatch)


def test_full_disk_stops_fit_before_training(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**8, 10**8))
    with pytest.raises(OutputDirectoryError, match=f"output directory {tmp_path / 'out'}.* has 0.10 GB free"):
        demo_fit(tmp_path / "out", monkeypatch)


def test_output_check_probes_the_log_and_checkpoint_folders(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = Trainer(accelerator="cpu", default_root_dir=tmp_path, callbacks=[ModelCheckpoint()],
                      enable_progress_bar=False)
    folders = output_dirs(trainer)
    assert folders == [str(tmp_path / "lightning_logs" / "version_0"),
                       str(tmp_path / "lightning_logs" / "version_0" / "checkpoints")]
    check_output_dirs(trainer, make_module(), min_free_gb=0)
    assert all(Path(folder).is_dir() and not list(Path(folder).iterdir()) for folder in folders[1:])
    assert [p.name for p in Path(folders[0]).iterdir()] == ["checkpoints"]  # no probe file left behind

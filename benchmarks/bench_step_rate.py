"""Training steps per second of the tiny backbones, and MiDashengLM's mel front end per batch.

Usage:
    python benchmarks/bench_step_rate.py [--batch 16] [--steps 20] [--warmup 3] [--repeats 3] [--threads 1]
    python benchmarks/bench_step_rate.py --front-end     # MiDashengLM's mel front end instead

A step is what the Trainer runs per batch without its own bookkeeping: embed the audio queries and
the caption documents of ``--batch`` pairs with the tiny random backbone (LoRA r 4 on q/k/v,
learnable τ, a linear head), symmetric InfoNCE, backward, AdamW. Clips are tones with noise of
1 to 8 s (spread evenly over the batch, so the batch is padded as a random one is). Run the script
at two commits to compare their steps (it reads the checkout it is in).

``--front-end`` compares, in the same run, the batched front end (``LogMelFrontEnd`` with the
lengths: one STFT over the padded batch, no value read back from the device) with the per-clip
loop it replaced (the lengths read on the host, one STFT per clip on its own samples), on the
padded batch above and on a batch of equal lengths (4.5 s each, as duration bucketing makes them).
Times are medians over ``--repeats`` runs of ``--steps`` calls after ``--warmup`` untimed ones; on a
CUDA device each run ends with a synchronisation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning.fabric.utilities.apply_func import move_data_to_device  # noqa: E402

from lightning_modules import (  # noqa: E402
    EmbeddingModule,
    EmbTokenPooler,
    LastTokenPooler,
    LinearHead,
    MiDashengLMBackbone,
    QwenOmniThinker,
)
from lightning_modules.adapters import LoraSettings  # noqa: E402
from lightning_modules.backbones.dasheng import num_mel_frames  # noqa: E402
from lightning_modules.backbones.midashenglm import MiDashengLMConfig  # noqa: E402
from lightning_modules.inputs import EmbedInput  # noqa: E402
from losses import InfoNCE  # noqa: E402


front_end_config = MiDashengLMConfig.tiny().audio_encoder_config


def examples(batch: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(batch):
        seconds = 1.0 + 7.0 * i / max(1, batch - 1)
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.01 * rng.standard_normal(t.size)
        out.append({"query": EmbedInput(audio=wave.astype(np.float32)),
                    "documents": [EmbedInput(text=f"a tone number {i} with some noise")], "clip_index": i})
    return out


def build(kind: str) -> EmbeddingModule:
    torch.manual_seed(0)
    lora = LoraSettings(r=4, dropout=0.0)
    if kind == "qwen-omni (tiny)":
        backbone, pooler = QwenOmniThinker(tiny=True, lora=lora, freeze_audio_encoder=True), EmbTokenPooler()
    else:
        backbone, pooler = MiDashengLMBackbone(tiny=True, lora=lora), LastTokenPooler()
    return EmbeddingModule(backbone, pooler, LinearHead(16), InfoNCE(learnable_temperature=True))


def per_clip(front_end, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The front end the batched one replaced: every clip alone, its length read on the host."""
    frames = num_mel_frames(audio.shape[-1], front_end_config)
    mels = audio.new_zeros(audio.shape[0], front_end.n_mels, frames)
    for row, length in enumerate(lengths.tolist()):
        mel = front_end(audio[row : row + 1, :length])
        mels[row, :, : mel.shape[-1]] = mel[0]
    return mels


def timed(run, steps: int, warmup: int, repeats: int, device: torch.device) -> float:
    """Median seconds per call of ``run``."""
    for _ in range(warmup):
        run()
    results = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        results.append((time.perf_counter() - start) / steps)
    return statistics.median(results)


def front_end_rows(module: EmbeddingModule, query: dict, args: argparse.Namespace, device: torch.device) -> list:
    front_end = module.backbone.model.audio_encoder.front_end
    equal = torch.full((args.batch,), 72000, device=device)
    rows = []
    for name, audio, lengths in (("padded 1-8 s", query["audio"], query["audio_lengths"]),
                                 ("equal 4.5 s", query["audio"][:, :72000], equal)):
        for how, run in (("per clip", lambda: per_clip(front_end, audio, lengths)),
                         ("batched", lambda: front_end(audio, lengths))):
            with torch.no_grad():
                rows.append((f"mel front end, {args.batch} clips {name}, {how}",
                             timed(run, args.steps, args.warmup, args.repeats, device)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--front-end", action="store_true",
                        help="time the mel front end, batched against per clip, instead of training steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    kinds = ["midashenglm (tiny)"] if args.front_end else ["midashenglm (tiny)", "qwen-omni (tiny)"]
    for kind in kinds:
        module = build(kind).to(device).train()
        batch = move_data_to_device(module.collate(examples(args.batch)), device)
        if args.front_end:
            rows += front_end_rows(module, batch["query"], args, device)
            continue
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            query, document = module.embed_batch(batch)
            module.loss(query, document, **module.loss_structure(batch)).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        rows.append((f"{kind} training step", timed(step, args.steps, args.warmup, args.repeats, device)))
    print(f"{device.type}, {args.threads} torch threads, batch {args.batch}, median of {args.repeats} x "
          f"{args.steps} calls after {args.warmup}")
    print("| what | ms/call | calls/s | × per clip |")
    print("|---|---|---|---|")
    baseline = 0.0
    for name, seconds in rows:
        if name.endswith("per clip"):
            baseline = seconds
        ratio = f"{baseline / seconds:.2f}" if "mel front end" in name else "-"
        print(f"| {name} | {1000 * seconds:.1f} | {1 / seconds:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

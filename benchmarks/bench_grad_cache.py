"""Peak memory of GradCache at a large batch versus a plain step at the chunk size.

Each configuration runs one training step (forward, loss, backward) of the tiny Qwen2.5-Omni thinker
in a fresh subprocess and reports the process's peak resident memory (``ru_maxrss``) and the growth
of the peak during the step over the resident memory just before it (model, data and collated batch
already in memory). Goal: GradCache at batch 256 with chunks of 16 needs at most 1.3× the memory of a
plain batch of 16 plus the extra input tensors of the full batch (GradCache must hold all 256
collated inputs; a plain chunk step holds 16), i.e. ``peak_gc <= 1.3 * peak_16 + (inputs_256 -
inputs_16)``. The last column is ``peak_gc / (1.3 * peak_16 + extra inputs)``: at most 1 meets it.
Run at a width where activations dominate (``--width 512``).

    python benchmarks/bench_grad_cache.py [--width 64] [--seconds 2.0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def step(batch: int, chunk: int | None, width: int, seconds: float) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from lightning_modules import EmbeddingModule, EmbTokenPooler, QwenOmniThinker
    from datamodules.inputs import EmbedInput
    from losses import InfoNCE

    torch.set_num_threads(1)
    module = EmbeddingModule(QwenOmniThinker(tiny=True, tiny_width=width), EmbTokenPooler(), loss=InfoNCE(),
                             grad_cache_chunk_size=chunk).train()
    rng = np.random.default_rng(0)
    examples = [
        {"query": EmbedInput(audio=(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)),
         "documents": [EmbedInput(text=f"a low hum followed by {i % 7} short clicks and a rising chirp")],
         "clip_index": i}
        for i in range(batch)
    ]
    collated = module.collate(examples)
    inputs_mb = sum(t.numel() * t.element_size() for t in tensors(collated)) / 2**20
    before = rss_mb()
    if chunk is None:
        query, document = module.embed_batch(collated)
        module.loss(query, document, collated["info"]).loss.backward()
    else:
        sides = [(collated["query"], "audio"), (collated["document"], "text")]
        module.grad_cache.backward(module.embed, sides, lambda emb: module.loss(*emb, collated["info"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mb": peak, "step_growth_mb": peak - before, "inputs_mb": inputs_mb}



def tensors(batch) -> list:
    """Every tensor inside a collated batch (nested dicts, lists, dataclasses)."""
    import torch
    from lightning.fabric.utilities.apply_func import apply_to_collection

    found: list = []
    apply_to_collection(batch, torch.Tensor, found.append)
    return found

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="tiny model width")
    parser.add_argument("--seconds", type=float, default=2.0, help="clip length")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch, chunk = json.loads(args.child)
        print(json.dumps(step(batch, chunk, args.width, args.seconds)))
        return
    rows = [("plain", 16, None), ("plain", 256, None), ("GradCache chunk 16", 256, 16)]
    results = []
    for name, batch, chunk in rows:
        out = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps([batch, chunk]), "--width", str(args.width),
             "--seconds", str(args.seconds)], capture_output=True, text=True, check=True)
        results.append((name, batch, json.loads(out.stdout.strip().splitlines()[-1])))
    base = results[0][2]
    print(f"tiny Qwen2.5-Omni thinker, width {args.width}, {args.seconds} s clips, one training step")
    print("| step | batch | inputs (MB) | peak RSS (MB) | × plain 16 | step growth (MB) | × plain 16 | "
          "÷ goal |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, r in results:
        goal = 1.3 * base["peak_mb"] + (r["inputs_mb"] - base["inputs_mb"])
        print(f"| {name} | {batch} | {r['inputs_mb']:.0f} | {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} | "
              f"{r['step_growth_mb']:.0f} | {r['step_growth_mb'] / base['step_growth_mb']:.2f} | "
              f"{r['peak_mb'] / goal:.2f} |")


if __name__ == "__main__":
    main()

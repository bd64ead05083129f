"""Re-ranker scoring speed: the plain path (every prompt whole, the query audio re-encoded for each of
its k candidates, as AuroLA does) against the shared-prefix path (the query prefix once, its key/value
cache reused by the k candidates), in one run, same prompts, same model.

    python benchmarks/bench_rerank.py [--widths 32 256] [--k 16] [--seconds 5] [--queries 3] [--device cpu]

Prints pairs/s of both paths, their ratio, and the largest difference of the scores p (they must agree
to round-off). ``--name_or_path`` with a real Qwen2.5-Omni checkpoint measures the real shape (GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules.rerank import RerankPrompts  # noqa: E402
from lightning_modules import QwenOmniThinker, RerankModule  # noqa: E402

CAPTIONS = ["a dog barks twice then a car passes", "rain falls on a metal roof", "a siren and then a knock",
            "two short clicks over a low hum", "a crowd cheers in a stadium", "birds chirp near running water"]


def run(module: RerankModule, groups: list[list], cached: bool) -> tuple[float, torch.Tensor]:
    device = next(module.parameters()).device
    scores = []
    start = time.perf_counter()
    with torch.no_grad():
        for pairs in groups:
            inputs = {k: v.to(device) for k, v in module.collate.backbone_collator(pairs).items()}
            out = module.score_with_prefix(inputs) if cached else module.score(inputs)
            scores.append(torch.sigmoid(out.match_logit()).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 256], help="tiny-model widths")
    parser.add_argument("--name_or_path", default=None, help="a real checkpoint instead of tiny widths")
    parser.add_argument("--k", type=int, default=16, help="candidates per query")
    parser.add_argument("--seconds", type=float, default=5.0, help="query clip length")
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    prompts = RerankPrompts()
    rng = np.random.default_rng(0)
    groups = [[prompts.pair("a2t", (0.1 * rng.standard_normal(int(16000 * args.seconds))).astype(np.float32),
                            CAPTIONS[j % len(CAPTIONS)] + f" ({j})") for j in range(args.k)]
              for _ in range(args.queries)]
    rows = []
    shapes = [("checkpoint", None)] if args.name_or_path else [(f"tiny width {w}", w) for w in args.widths]
    for label, width in shapes:
        torch.manual_seed(0)
        if width is None:
            backbone = QwenOmniThinker(name_or_path=args.name_or_path, dtype=args.dtype, lm_head=True, emb_token=None)
        else:
            backbone = QwenOmniThinker(tiny=True, tiny_width=width, dtype=args.dtype, lm_head=True, emb_token=None)
        module = RerankModule(backbone, k=args.k).eval().to(args.device)
        run(module, groups[:1], False), run(module, groups[:1], True)  # warm-up
        plain_s, plain_p = run(module, groups, False)
        cached_s, cached_p = run(module, groups, True)
        pairs = args.k * args.queries
        rows.append((label, pairs / plain_s, pairs / cached_s, plain_s / cached_s, float((plain_p - cached_p).abs().max())))
        print(f"{label}: plain {pairs / plain_s:.1f} pairs/s, shared prefix {pairs / cached_s:.1f} pairs/s", flush=True)
    print(f"\nA2T scoring, {args.queries} queries × k = {args.k}, {args.seconds:g} s query audio, {args.device}, {args.dtype}")
    print("| model | plain pairs/s | shared-prefix pairs/s | speed-up | max |Δp| |")
    print("|---|---|---|---|---|")
    for label, plain, cached, ratio, diff in rows:
        print(f"| {label} | {plain:.1f} | {cached:.1f} | {ratio:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()

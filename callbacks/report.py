"""Prints the test metrics as a table and writes them to a flat JSON file in the run directory."""

from __future__ import annotations

import json
import os

from lightning import Callback, LightningModule, Trainer


def format_table(results: dict[str, float]) -> str:
    """Rows are directions (t2a, a2t), columns the metric names."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        _, direction, name = key.split("/", 2)
        rows.setdefault(direction, {})[name] = value
    names = list(dict.fromkeys(name for row in rows.values() for name in row))
    lines = ["| direction | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for direction, row in rows.items():
        lines.append(f"| {direction} | " + " | ".join(f"{row.get(n, float('nan')):.2f}" for n in names) + " |")
    return "\n".join(lines)


class RetrievalReport(Callback):
    """After ``test``, prints the retrieval metrics and writes ``<log_dir>/<filename>``.

    The JSON is flat: keys such as ``test/t2a/R@1``, ``test/a2t/mAP@10``, ``test/t2a/medr``
    (R@k and mAP@10 in percent, ranks 1-based). ``log_dir`` is the logger's run directory
    (``trainer.log_dir``, e.g. ``runs/demo/lightning_logs/version_0``).

    Args:
        filename: name of the JSON file.
    """

    def __init__(self, filename: str = "test_metrics.json"):
        self.filename = filename
        #: path of the last JSON written.
        self.path: str | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", {})
        # log_dir broadcasts from rank 0, so every rank must ask for it before the others return.
        directory = trainer.log_dir or trainer.default_root_dir
        if not results or not trainer.is_global_zero:
            return
        print("\n" + format_table(results))
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, self.filename)
        with open(self.path, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        print(f"test metrics written to {self.path}")

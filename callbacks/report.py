"""Test reports: the flat metrics JSON, a markdown table and a recall-per-k plot in the run directory."""

from __future__ import annotations

import json
import os
import re

from lightning import Callback, LightningModule, Trainer

__all__ = ["RetrievalReport", "format_markdown", "format_table", "plot_recall"]

#: metric groups that rank candidates; their tables share columns (R@k, mAP@10, medr, meanr).
RETRIEVAL_GROUPS = ("t2a", "a2t", "t2s", "s2t", "t2t")
#: every group a metric key may carry after the stage and the optional set name.
GROUPS = RETRIEVAL_GROUPS + ("hn", "qa", "diag", "settings")
#: the row label of metrics without a set name (the unnamed set, or the mean over named sets).
UNNAMED = "all"


def split_key(key: str) -> tuple[str, str, str]:
    """``test/clotho/t2a/R@1`` → ``("clotho", "t2a", "R@1")``; ``test/t2a/R@1`` → ``("all", "t2a", "R@1")``."""
    parts = key.split("/")[1:]  # drop the stage
    if parts and parts[0] not in GROUPS:
        name, parts = parts[0], parts[1:]
    else:
        name = UNNAMED
    if len(parts) == 1:  # a setting reported beside the metrics, e.g. test/rerank/alpha_t2a
        return name, "settings", parts[0]
    if not parts:
        raise ValueError(f"metric key {key!r} has no group and name")
    return name, parts[0], "/".join(parts[1:])


def _rows(results: dict[str, float], groups: tuple[str, ...]) -> dict[tuple[str, str], dict[str, float]]:
    rows: dict[tuple[str, str], dict[str, float]] = {}
    for key, value in results.items():
        name, group, metric = split_key(key)
        if group in groups:
            rows.setdefault((name, group), {})[metric] = value
    return rows


def _natural(name: str) -> list:
    """Sort key that puts R@5 before R@10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _format(value: float) -> str:
    """Two decimals, or three significant digits for small values (e.g. an MMD of 0.0012)."""
    return f"{value:.3g}" if 0 < abs(value) < 0.1 else f"{value:.2f}"


def _table(rows: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    names = sorted({metric for row in rows.values() for metric in row}, key=_natural)
    lines = ["| set | group | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    order = sorted(rows, key=lambda row: (row[0] == UNNAMED, row[0], GROUPS.index(row[1])))
    for name, group in order:
        row = rows[(name, group)]
        cells = " | ".join(_format(row[n]) if n in row else "" for n in names)
        lines.append(f"| {name} | {group} | {cells} |")
    return lines


def format_markdown(results: dict[str, float]) -> str:
    """One markdown table per kind of metric: retrieval, hard negatives, QA, diagnostics.

    Rows are (set, group), e.g. (clotho, t2a); columns the metric names. Sets without a name (the
    shorthand set, or the mean over the named audio–text sets) are labelled ``all``.
    """
    sections = []
    for title, groups in (
        ("Retrieval (R@k, mAP@10 in %, ranks 1-based)", RETRIEVAL_GROUPS),
        ("Hard negatives (HNSR@k, R@k in %; Δ-rank = rank(negative) − rank(target))", ("hn",)),
        ("QA by retrieval (accuracy in %)", ("qa",)),
        ("Embedding diagnostics", ("diag",)),
        ("Settings (re-ranking: α per direction, top k)", ("settings",)),
    ):
        rows = _rows(results, groups)
        if rows:
            sections.append("\n".join([f"### {title}", "", *_table(rows)]))
    return "\n\n".join(sections)


def format_table(results: dict[str, float]) -> str:
    """The retrieval table alone (what ``test`` prints)."""
    return "\n".join(_table(_rows(results, RETRIEVAL_GROUPS)))


def plot_recall(results: dict[str, float], path: str) -> bool:
    """Plot R@k against k, one line per (set, direction); returns ``False`` when there is no R@k."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for key, value in results.items():
        name, group, metric = split_key(key)
        match = re.fullmatch(r"R@(\d+)", metric)
        if match and group in RETRIEVAL_GROUPS:
            curves.setdefault(f"{name} {group}", []).append((int(match.group(1)), value))
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in sorted(curves.items()):
        ks, values = zip(*sorted(points))
        axes.plot(ks, values, marker="o", label=label)
    axes.set_xlabel("k")
    axes.set_ylabel("R@k (%)")
    axes.set_ylim(0, 100)
    axes.set_xticks(sorted({k for points in curves.values() for k, _ in points}))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def plot_alpha(curves: dict[str, list[tuple[float, float]]], path: str) -> None:
    """Fused R@1 against the fusion weight α, one line per direction (the validation grid search)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for direction, points in sorted(curves.items()):
        alphas, values = zip(*points)
        axes.plot(alphas, values, marker=".", label=direction)
    axes.set_xlabel("α (fused score s + α·p)")
    axes.set_ylabel("R@1 (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


class RetrievalReport(Callback):
    """After ``test``, prints the retrieval table and writes three files into the run directory.

    - ``<stem>.json``: the flat metrics, e.g. ``test/t2a/R@1``, ``test/clotho/a2t/mAP@10``,
      ``test/mmau/qa/accuracy/sound``, ``test/audiocaps/hn/HNSR@1`` (R@k, mAP@10, accuracies in
      percent; ranks 1-based).
    - ``<stem>.md``: the same as markdown tables (retrieval, hard negatives, QA, diagnostics).
    - ``<stem>.png``: R@k against k per set and direction.
    - ``<stem>_alpha.png`` (re-rankers only): fused R@1 against α, from the validation grid search.

    The run directory is the logger's (``trainer.log_dir``, e.g.
    ``runs/demo/lightning_logs/version_0``).

    Args:
        filename: name of the JSON file; the markdown and PNG files share its stem.
    """

    def __init__(self, filename: str = "test_metrics.json"):
        self.filename = filename
        #: paths of the last files written (JSON, markdown, PNG or ``None`` without R@k).
        self.path: str | None = None
        self.markdown_path: str | None = None
        self.plot_path: str | None = None
        #: the fused R@1 against α of a re-ranker (``<stem>_alpha.png``), else ``None``.
        self.alpha_plot_path: str | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results = getattr(pl_module, "test_results", {})
        # log_dir broadcasts from rank 0, so every rank must ask for it before the others return.
        directory = trainer.log_dir or trainer.default_root_dir
        if not results or not trainer.is_global_zero:
            return
        print("\n" + format_table(results))
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, self.filename)
        stem = os.path.splitext(self.path)[0]
        with open(self.path, "w") as f:
            json.dump(results, f, indent=2, sort_keys=True)
        self.markdown_path = stem + ".md"
        with open(self.markdown_path, "w") as f:
            f.write(format_markdown(results) + "\n")
        self.plot_path = stem + ".png" if plot_recall(results, stem + ".png") else None
        # A re-ranker also reports how its fused R@1 varied with α on the validation set.
        curves = getattr(pl_module, "alpha_curves", None)
        self.alpha_plot_path = None
        if curves:
            self.alpha_plot_path = stem + "_alpha.png"
            plot_alpha(curves, self.alpha_plot_path)
        print(f"test reports written to {self.path} (.md, .png)")

"""Ablation sweeps: run a grid of config variants, one subprocess each, and tabulate the results.

``python main.py sweep --config configs/demo.yaml --sweep configs/sweeps/losses.yaml`` expands the
sweep file into the cartesian product of its axes, runs ``main.py fit`` once per variant and
writes ``results.csv``, ``results.md`` and ``results.png`` to the output directory.

A sweep file names axes; each axis maps value names to a list of *entries*, and ``base_args``
(optional) lists entries applied to every variant before the variant's own::

    base_args:
      - trainer.max_epochs=10
    axes:
      loss:
        infonce: []                                     # the recipe as it is
        hybrid: [model.loss=HybridNCE]
      pool:
        emb: []
        mean: [configs/ablations/pooling/mean.yaml]     # an overlay config

An entry is either an overlay YAML path (passed as ``--config PATH``) or a ``key=value`` setting
in CLI form (``model.loss.init_args.temperature=0.07``; a leading ``--`` is optional). Entries
apply in order: recipe configs, ``base_args``, the variant's values in axis order, then any
extra arguments given to ``sweep`` itself, so later entries win.

Each variant runs in a fresh Python process with ``--trainer.default_root_dir
<output>/<variant>``, so a crash (or the kernel killing it for memory) cannot take down the others.
Its outcome goes to ``<output>/<variant>/sweep_result.json``. Re-running the sweep skips a variant
whose record says ``ok`` and whose command has not changed; every other variant (failed,
interrupted, or with changed settings) is run again from an empty directory.

On a small model a difference of a point or two between variants is often noise. ``--seeds N``
runs every variant N times, with ``--seed_everything`` 0 … N-1, each in
``<output>/<variant>/seed=<i>``, and the table shows the mean ± the sample standard deviation over
the finished seeds. The global seed fixes the initialisation of heads and LoRA adapters, dropout,
and a tiny backbone's weights where its ``seed`` is ``null`` (as in ``configs/demo.yaml``; an
integer ``seed`` pins them, and then the runs of a variant are identical). The data module's own
``seed`` (the data order and, for the synthetic demo, the data itself) stays the recipe's.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAIN = Path(__file__).resolve().parents[2] / "main.py"
RECORD = "sweep_result.json"
SETTING = re.compile(r"^(?:--)?([A-Za-z_][\w.\-]*)=(.*)$", re.DOTALL)
#: Columns of the markdown table: (metric key, header). Test metrics come from the best checkpoint.
TABLE_METRICS = [
    ("test/t2a/R@1", "T2A R@1"),
    ("test/t2a/R@5", "T2A R@5"),
    ("test/t2a/mAP@10", "T2A mAP@10"),
    ("test/a2t/R@1", "A2T R@1"),
    ("test/a2t/mAP@10", "A2T mAP@10"),
    ("best val/t2a/R@1", "best val T2A R@1"),
]
ERROR_CHARS = 2000
HEADLINE_CHARS = 300
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt)\b|.*\berror: )")


@dataclass
class Variant:
    """One point of the grid.

    Attributes:
        name: run name, ``axis=value`` pairs joined by commas (filesystem-safe).
        values: the value name chosen on each axis.
        entries: the overlay paths and settings of those values, in order.
    """

    name: str
    values: dict[str, str]
    entries: list[str]

    def settings(self) -> str:
        """The entries as one readable line (``recipe`` when the variant changes nothing)."""
        return " ".join(self.entries) or "recipe"


def safe_name(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9._+-]`` replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9._+\-]", "-", str(text)) or "-"


def entry_args(entry: str) -> list[str]:
    """CLI arguments of one entry: ``["--config", path]`` or ``["--key=value"]``."""
    match = SETTING.match(entry)
    if match:
        return [f"--{match[1]}={match[2]}"]
    return ["--config", entry]


def check_entries(entries: Any, where: str) -> list[str]:
    """Validate a list of entries (a single string or ``null`` is accepted too)."""
    if entries is None:
        return []
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise ValueError(f"{where}: expected a list of overlay paths and key=value settings, got {entries!r}")
    for entry in entries:
        if SETTING.match(entry):
            continue
        if not entry.endswith((".yaml", ".yml")):
            raise ValueError(f"{where}: {entry!r} is neither a key=value setting nor a .yaml overlay")
        # A misspelt overlay would fail every variant that uses it: catch it before running any.
        if not Path(entry).is_file():
            raise ValueError(f"{where}: overlay {entry!r} does not exist")
    return list(entries)


def load_sweep(path: str | Path) -> tuple[list[str], list[Variant]]:
    """Read a sweep file; return its ``base_args`` and the expanded grid (in axis order)."""
    with open(path) as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict) or set(spec) - {"axes", "base_args"}:
        raise ValueError(f"{path}: a sweep file has the keys 'axes' and (optional) 'base_args'")
    axes = spec.get("axes")
    if not isinstance(axes, dict) or not axes:
        raise ValueError(f"{path}: 'axes' must map axis names to their values")
    base_args = check_entries(spec.get("base_args"), f"{path}: base_args")
    choices = []
    for axis, values in axes.items():
        if not isinstance(values, dict) or not values:
            raise ValueError(f"{path}: axis {axis!r} must map value names to entries")
        choices.append(
            [(str(axis), str(value), check_entries(entries, f"{path}: {axis}.{value}")) for value, entries in values.items()]
        )
    return base_args, expand_grid(choices)


def expand_grid(choices: list[list[tuple[str, str, list[str]]]]) -> list[Variant]:
    """Cartesian product of the axes; ``choices`` holds one ``(axis, value, entries)`` list per axis."""
    variants = []
    for combination in itertools.product(*choices):
        name = ",".join(f"{safe_name(axis)}={safe_name(value)}" for axis, value, _ in combination)
        values = {axis: value for axis, value, _ in combination}
        entries = [entry for _, _, value_entries in combination for entry in value_entries]
        variants.append(Variant(name, values, entries))
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variant names collide after making them filesystem-safe: {duplicates}")
    return variants


def variant_command(
    variant: Variant,
    configs: list[str],
    base_args: list[str],
    extra: list[str],
    stage: str,
    run_dir: Path,
    seed: int | None = None,
) -> list[str]:
    """The full command line that runs one variant (with ``seed``: under that global seed)."""
    command = [sys.executable, str(MAIN), stage]
    for config in configs:
        command += ["--config", config]
    for entry in [*base_args, *variant.entries]:
        command += entry_args(entry)
    if seed is not None:
        command.append(f"--seed_everything={seed}")
    return [*command, *extra, "--trainer.default_root_dir", str(run_dir)]


def run_seeds(seeds: int) -> list[int | None]:
    """The global seed of each run of a variant: the recipe's own for one run, else 0 … seeds-1."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    return [None] if seeds == 1 else list(range(seeds))


def run_directory(output: Path, variant: Variant, seed: int | None) -> Path:
    return output / variant.name if seed is None else output / variant.name / f"seed={seed}"


def read_metrics(run_dir: Path) -> dict[str, float]:
    """Test metrics (``test_metrics.json``) and the last logged validation metrics of a run.

    Validation values come from the TensorBoard event files (the default logger); ``best
    val/t2a/R@1`` is the highest validation T2A R@1 over the run, the score the default checkpoint
    selects the tested weights by.
    """
    metrics: dict[str, float] = {}
    for path in sorted(run_dir.rglob("test_metrics.json"), key=lambda p: p.stat().st_mtime):
        metrics.update(json.loads(path.read_text()))
    event_dirs = sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")})
    if event_dirs:
        # tensorboard is only needed here; importing it lazily keeps `main.py --help` quick.
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        for directory in event_dirs:
            events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
            events.Reload()
            for tag in events.Tags()["scalars"]:
                if tag.startswith("val/"):
                    series = [e.value for e in sorted(events.Scalars(tag), key=lambda e: (e.step, e.wall_time))]
                    metrics[tag] = series[-1]
                    if tag == "val/t2a/R@1":
                        metrics["best val/t2a/R@1"] = max(series)
    return metrics


def error_summary(returncode: int, stderr: str) -> str:
    """The exit status and the tail of stderr (where the traceback or CLI error ends), whole lines."""
    status = f"exit code {returncode}" if returncode >= 0 else f"killed by signal {-returncode}"
    if returncode in (-9, 137):
        status += " (out of memory?)"
    tail = stderr.strip()
    if len(tail) > ERROR_CHARS:
        tail = tail[-ERROR_CHARS:].partition("\n")[2]
    return f"{status}\n{tail}" if tail else status


def error_headline(error: str) -> str:
    """One line for the table: the exit status and the last exception (or CLI error) message.

    Messages span several lines (jsonargparse lists the reason of each rejected type under its
    ``ValueError``), so everything from the last exception line on is joined and shortened.
    """
    status, _, tail = error.partition("\n")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    message = "; ".join(lines[starts[-1] if starts else -1 :])
    if len(message) > HEADLINE_CHARS:
        message = message[: HEADLINE_CHARS - 1] + "…"
    return f"{status}: {message}" if message else status


def run_variant(variant: Variant, command: list[str], run_dir: Path, seed: int | None = None) -> dict[str, Any]:
    """Run one variant in a subprocess (logs in ``run_dir``) and return its result record."""
    if run_dir.exists():
        # Leftovers of a failed or outdated attempt would be mistaken for this run's metrics.
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = time.perf_counter()
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        returncode = subprocess.run(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL).returncode
    seconds = time.perf_counter() - start
    ok = returncode == 0
    record = {
        "variant": variant.name,
        "seed": seed,
        "values": variant.values,
        "settings": variant.settings(),
        "command": command,
        "status": "ok" if ok else "failed",
        "seconds": round(seconds, 1),
        "error": "" if ok else error_summary(returncode, (run_dir / "stderr.log").read_text(errors="replace")),
        "metrics": read_metrics(run_dir),
    }
    (run_dir / RECORD).write_text(json.dumps(record, indent=2))
    return record


def finished_record(run_dir: Path, command: list[str]) -> dict[str, Any] | None:
    """The earlier record of this variant if it finished ``ok`` with the same command (interpreter aside)."""
    path = run_dir / RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("status") == "ok" and record.get("command", [])[1:] == command[1:]:
        return record
    return None


def format_value(value: float | None) -> str:
    """A metric with two decimals, or a dash when the run did not report it."""
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per variant (in first-seen order) over its runs (one per seed).

    Each summary has ``variant``, ``settings``, ``runs`` and ``finished`` (run counts),
    ``seconds`` (summed), ``failures`` (the failed runs' records) and ``metrics``: per metric
    reported by a finished run, ``(mean, sample standard deviation or NaN for one value, count)``.
    """
    summaries: dict[str, dict[str, Any]] = {}
    for r in records:
        summary = summaries.setdefault(
            r["variant"],
            {"variant": r["variant"], "settings": r["settings"], "runs": 0, "finished": 0, "seconds": 0.0,
             "failures": [], "values": {}},
        )  # fmt: skip
        summary["runs"] += 1
        summary["seconds"] += r["seconds"]
        if r["status"] != "ok":
            summary["failures"].append(r)
            continue
        summary["finished"] += 1
        for key, value in r["metrics"].items():
            summary["values"].setdefault(key, []).append(value)
    for summary in summaries.values():
        values = summary.pop("values")
        summary["metrics"] = {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else math.nan, len(v))
                              for key, v in values.items()}  # fmt: skip
    return list(summaries.values())


def format_summary(mean: float, std: float) -> str:
    """``mean ± std`` (two decimals), or the mean alone when there is no spread to report."""
    return format_value(mean) if math.isnan(std) else f"{format_value(mean)} ± {std:.2f}"


def markdown_table(records: list[dict[str, Any]], title: str) -> str:
    """Markdown report: one row per variant (mean ± std over its seeds), the best mean of each metric
    in bold, failures below."""
    summaries = summarise(records)
    columns = [(key, header) for key, header in TABLE_METRICS if any(key in s["metrics"] for s in summaries)]
    means = {key: [s["metrics"][key][0] for s in summaries if key in s["metrics"]] for key, _ in columns}
    best = {key: max(values, default=None) for key, values in means.items()}
    seeded = any(s["runs"] > 1 for s in summaries)
    headers = ["variant", "settings", *(header for _, header in columns), "status", "seconds"]
    lines = [title, "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for s in summaries:
        cells = [f"`{s['variant']}`", s["settings"].replace("|", "\\|")]
        for key, _ in columns:
            mean, std, _ = s["metrics"].get(key, (None, math.nan, 0))
            text = "–" if mean is None else format_summary(mean, std)
            cells.append(f"**{text}**" if mean is not None and mean == best[key] else text)
        status = "ok" if s["finished"] == s["runs"] else "failed" if not s["finished"] else "partial"
        if seeded:
            status += f" {s['finished']}/{s['runs']}"
        cells += [status, f"{s['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for s in summaries for r in s["failures"]]
    if failures:
        lines += ["", "Failed runs (the full stderr tail is in results.csv):", ""]
        for r in failures:
            headline = error_headline(r["error"]).replace("`", "'")
            seed = "" if r.get("seed") is None else f" seed={r['seed']}"
            # A code span keeps markdown from reading `<class ...>` in messages as HTML tags.
            lines.append(f"- `{r['variant']}`{seed}: `{headline}`")
    return "\n".join(lines) + "\n"


def write_csv(records: list[dict[str, Any]], axes: list[str], path: Path) -> None:
    """One row per run: variant, seed (empty for the recipe's), axis values, settings, status,
    seconds, every metric, error."""
    metric_keys = sorted({k for r in records for k in r["metrics"]})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", *axes, "settings", "status", "seconds", *metric_keys, "error"])
        for r in records:
            seed = "" if r.get("seed") is None else r["seed"]
            writer.writerow(
                [r["variant"], seed, *(r["values"].get(a, "") for a in axes), r["settings"], r["status"],
                 r["seconds"], *(r["metrics"].get(k, "") for k in metric_keys), r["error"]]
            )  # fmt: skip


def write_chart(records: list[dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars of T2A and A2T R@1 per variant with finished runs (test metrics, else last
    validation): the mean over seeds, with the standard deviation as error bars."""
    # The object-oriented API renders with Agg without switching pyplot's global backend.
    from matplotlib.figure import Figure

    done = [s for s in summarise(records) if s["finished"]]
    split = "test" if any("test/t2a/R@1" in s["metrics"] for s in done) else "val"
    fig = Figure(figsize=(max(6.0, 1.1 * len(done) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    if not done:
        ax.text(0.5, 0.5, "no finished variant", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        width = 0.4
        for i, direction in enumerate(["t2a", "a2t"]):
            stats = [s["metrics"].get(f"{split}/{direction}/R@1", (math.nan, math.nan, 0)) for s in done]
            errors = [0.0 if math.isnan(std) else std for _, std, _ in stats]
            positions = [x + (i - 0.5) * width for x in range(len(done))]
            bars = ax.bar(positions, [mean for mean, _, _ in stats], width, yerr=errors, capsize=3,
                          label=direction.upper())  # fmt: skip
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(done)), [s["variant"] for s in done], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{split} R@1 (%)")
        ax.legend()
    ax.set_title(title)
    fig.savefig(path, dpi=120)


def write_results(records: list[dict[str, Any]], axes: list[str], output: Path, title: str) -> None:
    """``results.csv``, ``results.md`` and ``results.png`` in ``output``."""
    write_csv(records, axes, output / "results.csv")
    (output / "results.md").write_text(markdown_table(records, f"### {title}") + "\n![R@1 per variant](results.png)\n")
    write_chart(records, output / "results.png", title)


def parse_args(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The sweep's own options, and the remaining arguments (passed on to every variant)."""
    parser = argparse.ArgumentParser(
        prog="main.py sweep",
        allow_abbrev=False,
        description="Run every variant of a sweep file in its own process and tabulate the results. "
        "Any further argument (e.g. --trainer.max_steps=2) is passed to every variant, last.",
    )
    parser.add_argument("--config", action="append", required=True, help="recipe config(s), in order")
    parser.add_argument("--sweep", required=True, help="sweep file (axes and base_args)")
    parser.add_argument("--output", help="output directory (default: runs/sweeps/<sweep file name>)")
    parser.add_argument("--stage", default="fit", choices=["fit", "validate", "test"], help="subcommand per variant")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, one per line, and run nothing")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="runs per variant, with --seed_everything 0 .. N-1; the table reports mean ± std (default 1: "
        "one run with the recipe's seed)",
    )
    return parser.parse_known_args(args)


def run_sweep(args: list[str]) -> list[dict[str, Any]]:
    """Entry point of ``main.py sweep``; returns one result record per run (none on a dry run)."""
    options, extra = parse_args(args)
    base_args, variants = load_sweep(options.sweep)
    output = Path(options.output or Path("runs/sweeps") / Path(options.sweep).stem)
    runs = [(v, seed, run_directory(output, v, seed)) for v in variants for seed in run_seeds(options.seeds)]
    commands = [
        variant_command(variant, options.config, base_args, extra, options.stage, run_dir, seed)
        for variant, seed, run_dir in runs
    ]
    if options.dry_run:
        for command in commands:
            print(shlex.join(command))
        return []
    output.mkdir(parents=True, exist_ok=True)
    axes = list(variants[0].values)
    seeds = f", mean ± std over {options.seeds} seeds" if options.seeds > 1 else ""
    title = f"{Path(options.sweep).name} on {' + '.join(options.config)} ({options.stage}{seeds})"
    records = []
    for i, ((variant, seed, run_dir), command) in enumerate(zip(runs, commands), 1):
        name = variant.name if seed is None else f"{variant.name} seed={seed}"
        record = finished_record(run_dir, command)
        if record is not None:
            print(f"[{i}/{len(runs)}] {name}: finished earlier, skipped", flush=True)
        else:
            print(f"[{i}/{len(runs)}] {name}: running (logs in {run_dir})", flush=True)
            record = run_variant(variant, command, run_dir, seed)
            r1 = format_value(record["metrics"].get("test/t2a/R@1"))
            print(f"    {record['status']} in {record['seconds']:.0f} s, test T2A R@1 {r1}", flush=True)
        records.append(record)
        # Rewritten after every run so that a long sweep can be inspected while it runs.
        write_results(records, axes, output, title)
    print(markdown_table(records, f"### {title}"))
    print(f"results written to {output}/results.{{csv,md,png}}")
    return records

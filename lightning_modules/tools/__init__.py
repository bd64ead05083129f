"""Commands that are not training: every ``python main.py <tool>`` besides fit/validate/test/predict.

Each tool is a function ``run(argv) -> exit status or result`` with its own ``--help``; :data:`TOOLS`
is the one list ``main.py`` dispatches on and prints in ``python main.py --help``, so adding a tool
means one module here and one line in :data:`TOOLS`. Tools import their heavy dependencies lazily,
so ``python main.py --help`` and ``check-data`` stay fast and never build a model.

The tools' library code lives beside them: :mod:`~lightning_modules.tools.export` and
:mod:`~lightning_modules.tools.encoder` (inference model, ``from_pretrained``),
:mod:`~lightning_modules.tools.search` (exact top-k), :mod:`~lightning_modules.tools.sweep`,
:mod:`~lightning_modules.tools.serve` (the demo page; FastAPI is the optional extra ``serve``),
:mod:`~lightning_modules.tools.mine` (hard negatives for the re-ranker).
``check-data``, ``convert`` and ``shard`` only need the data layer, so they stay in
:mod:`datamodules.check`, :mod:`datamodules.convert` and :mod:`datamodules.shard_writer` and are
registered here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tool:
    """A subcommand: where its entry point lives and the line ``--help`` shows for it."""

    target: str  # "package.module:function", imported only when the tool runs
    summary: str

    def entry(self) -> Callable[[list[str]], Any]:
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)


TOOLS: dict[str, Tool] = {
    "check-data": Tool("datamodules.check:main", "scan a config's manifests and audio headers for bad samples"),
    "convert": Tool("datamodules.convert:main", "write a Clotho/AudioCaps/WavCaps/HF/NLI manifest as JSONL"),
    "export": Tool("lightning_modules.tools.export:main", "write a checkpoint as a self-contained model directory"),
    "mine": Tool("lightning_modules.tools.mine:main", "mine hard negatives per clip with an embedding model (re-ranker data)"),
    "search": Tool("lightning_modules.tools.search:main", "exact top-k search between two embeddings files"),
    "serve": Tool("lightning_modules.tools.serve:main", "a retrieval demo page and JSON API over a predict output"),
    "shard": Tool("datamodules.shard_writer:main", "write a manifest as WebDataset shards with an index (or index shards)"),
    "sweep": Tool("lightning_modules.tools.sweep:run_sweep", "run an ablation grid and tabulate the results"),
}


def tools_help() -> str:
    """The block ``python main.py --help`` appends: one line per tool."""
    width = max(len(name) for name in TOOLS)
    lines = ["other subcommands (each has its own --help):"]
    lines += [f"  {name:<{width}}  {tool.summary}" for name, tool in TOOLS.items()]
    return "\n".join(lines)


__all__ = ["TOOLS", "Tool", "tools_help"]

"""The dependency lower bounds of ``pyproject.toml`` and their pins in ``tests/min_versions.txt``.

``.ci/run`` installs the project with ``-c tests/min_versions.txt`` into a second environment and
runs part of the tests there, so every ``>=`` bound is a tested version only while the two files
agree: each dependency of the core list and of every extra has exactly one ``>=`` bound, and the
file pins it ``==`` that version (torch excepted: its minimum is not installable on the CI machine).
With ``ALM_MIN_VERSIONS=1`` (the second CI environment) the installed versions must be the pins.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
PINS = Path(__file__).resolve().parent / "min_versions.txt"
#: dependencies with a lower bound in pyproject.toml but no pin: CI installs the CPU build of torch
#: 2.13.0 first (no newer one, no CUDA build of several GB), so its minimum stays untested there.
UNPINNED = {"torch"}

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*$")
SPECIFIER = re.compile(r"^(>=|<=|==|!=|~=|<|>)\s*([0-9][0-9A-Za-z.+!*-]*)$")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)$")


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of ``-_.`` as ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of ``version`` (``2.13.0+cpu`` → 2, 13), trailing zeros dropped, so
    that ``0.6`` and ``0.6.0`` are the same version."""
    match = re.match(r"^(\d+(?:\.\d+)*)", version)
    if match is None:
        raise ValueError(f"not a version with a numeric release: {version!r}")
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def lower_bounds(path: Path = PYPROJECT) -> dict[str, str]:
    """Name → the ``>=`` version of every requirement of ``[project]`` (core and every extra).

    Raises ``ValueError`` naming the file and the requirement for one without exactly one ``>=``, an
    environment marker or a ``==`` pin, and for a dependency listed twice with different bounds."""
    project = tomllib.loads(path.read_text())["project"]
    lists = {"dependencies": project.get("dependencies", [])}
    lists.update({f"optional-dependencies.{k}": v for k, v in project.get("optional-dependencies", {}).items()})
    bounds: dict[str, str] = {}
    for where, requirements in lists.items():
        for requirement in requirements:
            problem = f"{path}: [project] {where}: {requirement!r}"
            if ";" in requirement or "@" in requirement:
                raise ValueError(f"{problem}: markers and direct references are not supported here")
            name, _, specifiers = REQUIREMENT.match(requirement).groups()
            parsed = [SPECIFIER.match(s.strip()) for s in specifiers.split(",")] if specifiers else []
            if any(p is None for p in parsed):
                raise ValueError(f"{problem}: cannot read the version specifiers {specifiers!r}")
            minimums = [p.group(2) for p in parsed if p.group(1) == ">="]
            if len(minimums) != 1 or any(p.group(1) in ("==", "~=", ">") for p in parsed):
                raise ValueError(f"{problem}: needs exactly one '>=' lower bound (and no ==, ~= or >)")
            key = canonical(name)
            if key in bounds and release(bounds[key]) != release(minimums[0]):
                raise ValueError(f"{problem}: {name} has the lower bound {bounds[key]} elsewhere")
            bounds.setdefault(key, minimums[0])
    return bounds


def pins(path: Path = PINS) -> dict[str, str]:
    """Name → version of every ``name==version`` line of ``path`` (``#`` comments and blank lines
    skipped). Raises ``ValueError`` naming the file and line of any other line or of a repeated name."""
    pinned: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = PIN.match(text.replace(" ", ""))
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line!r}")
        name = canonical(match.group(1))
        if name in pinned:
            raise ValueError(f"{path}:{number}: {match.group(1)} is pinned twice")
        pinned[name] = match.group(2)
    return pinned


def test_every_lower_bound_is_pinned_and_nothing_else():
    bounds, pinned = lower_bounds(), pins()
    assert UNPINNED <= bounds.keys()
    assert sorted(pinned) == sorted(bounds.keys() - UNPINNED)
    drift = {name: (bounds[name], pinned[name]) for name in pinned if release(pinned[name]) != release(bounds[name])}
    assert not drift, f"pyproject.toml's >= bound vs tests/min_versions.txt's pin: {drift}"


def test_installed_versions_meet_the_bounds():
    """Every installed dependency is at least its bound; in the minimum-versions environment
    (``ALM_MIN_VERSIONS=1``), exactly its pin, so that its test run is one at the minimums."""
    bounds, pinned = lower_bounds(), pins()
    installed = {}
    for name in bounds:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra that this environment does not hold
    core_list = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    core = {canonical(REQUIREMENT.match(r).group(1)) for r in core_list}
    assert core <= installed.keys(), f"core dependencies not installed: {sorted(core - installed.keys())}"
    low = {n: v for n, v in installed.items() if release(v) < release(bounds[n])}
    assert not low, f"installed below pyproject.toml's bound: {low}"
    if os.environ.get("ALM_MIN_VERSIONS") == "1":
        missing = sorted(pinned.keys() - installed.keys())
        assert not missing, f"pinned but not installed: {missing}"
        off = {n: (installed[n], pinned[n]) for n in pinned if release(installed[n]) != release(pinned[n])}
        assert not off, f"installed vs tests/min_versions.txt: {off}"


def test_every_project_module_imports():
    """The whole project imports against the installed dependencies (optional ones are imported
    where they are used, not at module import)."""
    names = ["main"]
    for package in ["lightning_modules", "losses", "datamodules", "callbacks"]:
        module = importlib.import_module(package)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")]
    for name in names:
        importlib.import_module(name)
    assert len(names) > 40


@pytest.mark.parametrize(
    "text, message",
    [
        ('dependencies = ["numpy"]', "exactly one '>='"),
        ('dependencies = ["numpy==1.26"]', "exactly one '>='"),
        ('dependencies = ["numpy>=1.26; python_version<\'3.12\'"]', "markers"),
        ('dependencies = ["numpy>=1.26", "numpy>=2.0"]', "lower bound 1.26 elsewhere"),
        ('dependencies = ["numpy>=1.26,<=3"]\n[project.optional-dependencies]\nx = ["tqdm>>4"]', "cannot read"),
    ],
)
def test_unreadable_bounds_name_the_file_and_requirement(tmp_path, text, message):
    path = tmp_path / "pyproject.toml"
    path.write_text(f'[project]\nname = "x"\n{text}\n')
    with pytest.raises(ValueError, match=message) as err:
        lower_bounds(path)
    assert str(path) in str(err.value)


def test_bounds_read_extras_and_upper_bounds(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text(
        '[project]\nname = "x"\ndependencies = ["torch>=2.7,<=2.13.0", "jsonargparse[signatures]>=4.27.7"]\n'
        '[project.optional-dependencies]\nserve = ["Python_Multipart >= 0.0.18"]\n'
        'dev = ["python-multipart>=0.0.18.0"]\n'
    )
    assert lower_bounds(path) == {"torch": "2.7", "jsonargparse": "4.27.7", "python-multipart": "0.0.18"}


def test_bad_pin_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "pins.txt"
    path.write_text("# comment\nnumpy==1.23.2\n\npeft>=0.6\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:4: expected 'name==version'"):
        pins(path)
    path.write_text("numpy==1.23.2\nNumPy==1.24\n")
    with pytest.raises(ValueError, match=r":2: NumPy is pinned twice"):
        pins(path)
    path.write_text("Py_YAML==6.0  # a comment\n")
    assert pins(path) == {"py-yaml": "6.0"}


def test_release_compares_numerically():
    assert release("0.6") == release("0.6.0") < release("0.10")
    assert release("2.13.0+cpu") == (2, 13) and release("1.4.0.post0") == (1, 4)
    with pytest.raises(ValueError, match="numeric release"):
        release("dev")

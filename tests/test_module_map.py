"""`docs/DEVELOPMENT.md`'s module map matches the tree: every Python module of `lipsync/`,
`export/`, `gateway/` and `perf/` has exactly one row, and every path the map names exists."""

from __future__ import annotations

import re
from collections import Counter

from lipsync.paths import REPO_ROOT

MAP = REPO_ROOT / "docs" / "DEVELOPMENT.md"
PACKAGES = ("lipsync", "export", "gateway", "perf")


def map_paths() -> list[str]:
    """The backticked paths of the module map's first column, one entry per mention."""
    section = MAP.read_text(encoding="utf-8").split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, f"no module map table in {MAP}"
    return [path for row in rows for path in re.findall(r"`([^`]+)`", row.split(" | ", 1)[0])]


def python_modules() -> list[str]:
    return sorted(
        path.relative_to(REPO_ROOT).as_posix()
        for package in PACKAGES
        for path in (REPO_ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    )


def test_every_module_has_exactly_one_row() -> None:
    listed = Counter(map_paths())
    missing = [m for m in python_modules() if listed[m] == 0]
    twice = sorted(p for p, n in listed.items() if n > 1)
    assert not missing, f"modules missing from the module map in {MAP.name}: {missing}"
    assert not twice, f"paths listed more than once in the module map: {twice}"


def test_every_listed_path_exists() -> None:
    gone = [p for p in map_paths() if not (REPO_ROOT / p).exists()]
    assert not gone, f"the module map in {MAP.name} names paths that do not exist: {gone}"

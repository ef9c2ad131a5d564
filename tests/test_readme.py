"""The README works in a fresh clone: it points at nothing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_readme_points_at_nothing_outside_the_repository() -> None:
    assert "../" not in README, [line for line in README.splitlines() if "../" in line]
    for target in re.findall(r"\]\(([^)\s]+)\)", README):
        if target.startswith(("http://", "https://", "#")):
            continue
        assert (ROOT / target.split("#")[0]).exists(), target


def code_lines() -> list[str]:
    lines, inside = [], False
    for line in README.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return lines


def test_every_example_calls_the_command_where_setup_installs_it() -> None:
    """`singularity-stack` is in .venv/bin, not on PATH: a bare one in an example is `command not found`."""
    examples = [line for line in code_lines() if re.search(r"(?<![\w/.-])singularity-stack\s", line)]
    assert examples == [], examples
    assert sum(".venv/bin/singularity-stack " in line for line in code_lines()) >= 6
    assert "source .venv/bin/activate" in README

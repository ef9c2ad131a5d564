"""Pulling code out of an LLM answer, and the diff a human approves."""

from __future__ import annotations

import difflib
import re

FENCE = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The first fenced code block of a Markdown answer, or None when there is none."""
    match = FENCE.search(text)
    return match.group(2) if match else None


def unified_diff(path: str, before: str, after: str) -> str:
    lines = difflib.unified_diff(
        before.splitlines(keepends=True),
        after.splitlines(keepends=True),
        fromfile=f"a/{path}" if before else "/dev/null",
        tofile=f"b/{path}",
    )
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


AMBIGUOUS_MARKERS = ("tbd", "???", "to be decided", "not sure", "somehow")


def ambiguity(description: str) -> str | None:
    """Why a task description is too vague to start on, or None. Deliberately simple and predictable:
    very short descriptions, open placeholders, or a description that is itself a question."""
    text = description.strip()
    words = text.split()
    if len(words) < 4:
        return f"the description has only {len(words)} word(s)"
    lowered = text.lower()
    for marker in AMBIGUOUS_MARKERS:
        if marker in lowered:
            return f"the description leaves {marker!r} open"
    if text.endswith("?"):
        return "the description is a question"
    return None

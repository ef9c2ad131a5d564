"""Test support for the Genesis sandbox: which tools a language needs, and what a leaked job looks like."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from singularity_stack.genesis.sandbox import SANDBOX_UID, probe_sandbox

# The interpreter each language needs on the host, and the Debian package that provides it.
TOOLS = {
    "python": ("python3", "python3"),
    "javascript": ("node", "nodejs"),
    "bash": ("bash", "bash"),
    "elixir": ("elixir", "elixir"),
}
LANGUAGES = sorted(TOOLS)

# Process names a leaked sandbox job could show up as on the host.
_JOB_COMMANDS = {"bwrap", "prlimit", "python3", "node", "bash", "sh", "beam.smp", "erl_child_setup", "sleep"}


def require_tool(executable: str, package: str) -> None:
    if shutil.which(executable, path="/usr/bin:/bin") is None:
        pytest.skip(f"MISSING TOOL: `{executable}` not found — apt-get install {package}")


def require_language(language: str) -> None:
    require_tool(*TOOLS[language])


@pytest.fixture(scope="session")
async def sandbox_ready() -> None:
    require_tool("bwrap", "bubblewrap")
    require_tool("prlimit", "util-linux")
    require_tool("python3", "python3")
    problem = await probe_sandbox()
    if problem is not None:
        pytest.skip(f"MISSING SANDBOX: bubblewrap cannot create namespaces here: {problem}")


def leaked_job_processes() -> list[str]:
    """Host processes still running as the sandbox uid (only meaningful when the tests run as root)."""
    leaked = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue  # exited while we looked
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields.get("Uid", "-1").split()[0])
        name = fields.get("Name", "").strip()
        if uid == SANDBOX_UID and name in _JOB_COMMANDS:
            leaked.append(f"{entry.name}:{name}")
    return leaked


async def assert_nothing_left_running() -> None:
    """Once a job's result is back, no process of it may remain, not even a zombie for the host's init."""
    if os.geteuid() != 0:
        return  # jobs then run under our own uid and cannot be told apart from other processes
    assert leaked_job_processes() == []

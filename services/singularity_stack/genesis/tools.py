"""Host tools (the linters) made reachable for the account jobs run as, or one line saying why they are not.

Jobs run as nobody when Genesis is root (sandbox.py), and bwrap, started as nobody, opens the tool's host
path itself to bind it into the sandbox. A tool under a private directory (a checkout in root's home, mode
0700) is out of its reach: Genesis then uses a copy in a root-owned 0755 directory nobody can reach
(reachable.py), prepared once per process. When even that fails, the problem names the path, the directory
in the way and the fix, and every job of the language reports it as an error.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from singularity_stack.reachable import Account, CopyFailed, blocked, reachable_copy

from .sandbox import SANDBOX_UID


@dataclass(frozen=True)
class PreparedTool:
    """The host path to bind for a tool, or the problem that keeps it from running (exactly one is set)."""

    path: str | None
    problem: str | None = None
    note: str = ""  # how the path was chosen, for /readyz


def job_account() -> Account | None:
    """The account jobs run as when it is not ours (we are root), else None."""
    return Account.of_uid(SANDBOX_UID, SANDBOX_UID) if os.geteuid() == 0 else None


@functools.cache
def prepare_tool(name: str, host_path: str | None, install_hint: str) -> PreparedTool:
    """`host_path` (None: not installed) as a path the job's account can execute."""
    if host_path is None:
        return PreparedTool(None, f"{name} is not installed: {install_hint}")
    path = Path(host_path)
    account = job_account()
    if account is None:
        if os.access(path, os.X_OK):
            return PreparedTool(host_path, note=host_path)
        return PreparedTool(None, f"Genesis cannot execute {name} at {path}: {install_hint}")
    in_the_way = blocked(path, account, os.X_OK)
    if in_the_way is None:
        return PreparedTool(host_path, note=host_path)
    who = f"Genesis runs jobs as {account.describe()}, who cannot reach {path} ({in_the_way})"
    try:
        copy = reachable_copy([path], path.parent, account, f"genesis-{name}") / path.name
    except CopyFailed as error:
        return PreparedTool(
            None,
            f"{who}, and no copy could be made where it can ({error}): "
            f"move the checkout under a directory others may traverse, or {install_hint}",
        )
    return PreparedTool(str(copy), note=f"{copy} (a copy: {who})")

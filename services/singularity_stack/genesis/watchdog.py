"""Kills every job of a Genesis that died, however it died.

Genesis starts this once (sandbox.py) with a pipe on its stdin whose only writer is Genesis. The kernel
closes that pipe when Genesis exits, SIGKILL included, so end-of-file here means "Genesis is gone":
every process in its job cgroups is killed and the cgroups are removed. The watchdog lives in its own
session, so the signals that stop Genesis's process group (Ctrl-C in `up`) do not stop it first.

    python -m singularity_stack.genesis.watchdog BASE_DIR...
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from singularity_stack.genesis import cgroups


def main(bases: list[str]) -> None:
    for name in (signal.SIGINT, signal.SIGHUP):
        signal.signal(name, signal.SIG_IGN)
    while sys.stdin.buffer.read(4096):
        pass  # Genesis never writes; anything it did would only be read past
    for base in map(Path, bases):
        cgroups.kill_all(base)
        cgroups.remove(base)


if __name__ == "__main__":
    main(sys.argv[1:])

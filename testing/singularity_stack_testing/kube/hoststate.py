"""What a local node leaves on the host outside its processes, found and removed: the Pods' processes and
cgroups (kubelet's cgroupfs driver puts every Pod under ``kubepods`` in each cgroup v1 hierarchy), mounts
under its run directory, and processes by what their command line mentions.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from . import hostnet

KUBEPODS_CGROUP = "kubepods"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def argv0(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    return ""


def cgroup_dirs() -> list[Path]:
    """kubelet's kubepods cgroup in every mounted hierarchy, deepest first."""
    found: list[Path] = []
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / KUBEPODS_CGROUP
        if top.is_dir():
            found.extend(_directories_under(top))
            found.append(top)
    return sorted(found, key=lambda path: len(path.parts), reverse=True)


def _directories_under(top: Path) -> list[Path]:
    """Every directory below `top`, walked with os.walk, which skips a cgroup kubelet removes mid-walk
    (Path.rglob raises FileNotFoundError on one)."""
    return [Path(root) / name for root, names, _ in os.walk(top) for name in names]


def kill_cgroup_processes(timeout: float = 15) -> None:
    """SIGKILL every process in the kubepods cgroups (the Pods' processes) until none is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = set()
        for directory in cgroup_dirs():
            with contextlib.suppress(OSError):
                pids.update(int(pid) for pid in (directory / "cgroup.procs").read_text().split())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.2)


def remove_cgroups(timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (directories := cgroup_dirs()) and time.monotonic() < deadline:
        for directory in directories:
            with contextlib.suppress(OSError):
                directory.rmdir()
        time.sleep(0.1)


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory``, deepest first (from /proc/self/mountinfo)."""
    prefix = str(directory).rstrip("/")
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return sorted(set(points), key=len, reverse=True)


def unmount_all(directory: Path) -> None:
    for _ in range(5):
        points = mounts_under(directory)
        if not points:
            return
        for point in points:
            hostnet.run("umount", point, check=False)
        for point in mounts_under(directory):
            hostnet.run("umount", "--lazy", point, check=False)


def listing(directory: Path) -> set[str]:
    return set(os.listdir(directory)) if directory.is_dir() else set()


def processes_mentioning(text: str) -> list[int]:
    pids = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids

"""A cgroup per Genesis job: memory, process count and CPU bounded for the job as a whole.

rlimits bind one process at a time and miss memory that no process maps (memfds, tmpfs files); a
memory cgroup counts every page the job's processes charge, whatever holds it. Every process of a job
starts inside its cgroup (the launcher moves itself in before it execs bubblewrap, see sandbox.py), a
job cannot leave it (it has no cgroupfs and no privilege), and killing a job is killing what is in it.

Layout: `<Genesis's own cgroup>/genesis-<pid>/job-<n>`, in each v1 hierarchy (memory, pids, cpu) or in
the v2 tree. `genesis-<pid>` directories whose process is gone (Genesis killed outright) are emptied
and removed by the next Genesis on the host, and the watchdog (watchdog.py) empties this one when
Genesis dies.

Where no writable cgroup tree is available (a Pod without a delegated cgroup tree, an account without
delegation) `JobCgroups.detect` says why; the sandbox then falls back to per-process rlimits and
oom_score_adj (sandbox.py), and /readyz and the README say so.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MODE_ENV = "GENESIS_SANDBOX_CGROUP"  # auto (default): use cgroups where writable | off
_V1_CONTROLLERS = ("memory", "pids", "cpu")  # cpu is optional: bandwidth, not a safety bound
_REQUIRED = ("memory", "pids")
_CPU_PERIOD_US = 100_000
_TCP_SHARE = 8  # v1: the part of a job's memory its TCP buffers may hold (v2 counts them in memory.max)
_KILL_ROUNDS = 200  # passes over cgroup.procs; a fork bomb is bounded by pids.max, so few are needed


class CgroupUnavailable(RuntimeError):
    """No writable cgroup tree with the controllers a job needs; the message says why."""


@dataclass(frozen=True)
class JobBounds:
    memory_bytes: int  # every page of the job: heaps, shared memory, memfds, tmpfs contents
    max_processes: int  # tasks (processes and threads)
    cpus: float  # CPU bandwidth, in CPUs


def _own_paths() -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount point, mount root, super options) of every cgroup mount, from mountinfo."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        fstype, options = fields[sep + 1], set(fields[sep + 3].split(","))
        if fstype in ("cgroup", "cgroup2"):
            mounts.append((fstype, fields[4], fields[3], options))
    return mounts


def _under_mount(point: str, root: str, own: str) -> Path:
    """Where `own` (a path of the cgroup namespace) is, below a mount of the hierarchy at `root`."""
    relative = own[len(root) :] if root != "/" and own.startswith(root) else own
    return Path(point) / relative.lstrip("/")


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:  # one write(2): cgroupfs files take a value per write
        handle.write(value)


def _pids_in(directory: Path) -> list[int]:
    try:
        return [int(pid) for pid in (directory / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def kill_all(directory: Path) -> bool:
    """SIGKILL every process in one cgroup until it is empty; True when it is."""
    kill_file = directory / "cgroup.kill"  # v2, Linux 5.14+: the kernel does it atomically
    if kill_file.exists():
        with contextlib.suppress(OSError):
            _write(kill_file, "1")
    for _ in range(_KILL_ROUNDS):
        pids = _pids_in(directory)
        if not pids:
            return True
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
    return not _pids_in(directory)


def remove(directory: Path) -> None:
    """rmdir a (killed) cgroup and anything below it; an empty cgroup goes at once."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.is_dir():
            kill_all(child)
            remove(child)
    for _ in range(100):  # the last exiting task may still be on its way out
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    log.error("cgroup %s could not be removed", directory)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path) -> None:
    """Empty and remove `genesis-<pid>` directories whose Genesis is gone."""
    for entry in parent.glob("genesis-*"):
        pid = entry.name.removeprefix("genesis-")
        if pid.isdigit() and not _process_alive(int(pid)):
            log.warning("removing the job cgroups of a Genesis that is gone: %s", entry)
            kill_all(entry)
            remove(entry)


class JobCgroup:
    """One job's cgroup, in every hierarchy it lives in."""

    def __init__(self, directories: list[Path], v2: bool) -> None:
        self.directories = directories
        self.v2 = v2

    @property
    def procs_files(self) -> list[str]:
        """What the launcher writes "0" to, to move itself in."""
        return [str(d / "cgroup.procs") for d in self.directories]

    def _memory_dir(self) -> Path:
        return self.directories[0] if self.v2 else next(d for d in self.directories if _is_memory(d))

    def oom_kills(self) -> int:
        """How many processes the kernel killed for the job's memory bound."""
        memory = self._memory_dir()
        source = memory / ("memory.events" if self.v2 else "memory.oom_control")
        with contextlib.suppress(OSError):
            for line in source.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def kill(self) -> None:
        kill_all(self.directories[0])  # the same processes are in each hierarchy

    def remove(self) -> None:
        self.kill()
        for directory in self.directories:
            remove(directory)


def _is_memory(directory: Path) -> bool:
    return (directory / "memory.limit_in_bytes").exists()


class JobCgroups:
    """Makes job cgroups below this process's own; `detect` raises CgroupUnavailable saying why not."""

    def __init__(self, bases: list[Path], v2: bool, controllers: tuple[str, ...]) -> None:
        self.bases = bases
        self.v2 = v2
        self.controllers = controllers
        self._numbers = itertools.count(1)

    @property
    def description(self) -> str:
        version = "v2" if self.v2 else "v1"
        return f"a cgroup per job (cgroup {version}: {', '.join(self.controllers)})"

    @classmethod
    def detect(cls) -> JobCgroups:
        if os.environ.get(MODE_ENV, "auto") == "off":
            raise CgroupUnavailable(f"{MODE_ENV}=off")
        own, mounts = _own_paths(), _mounts()
        v1 = {c: m for m in mounts if m[0] == "cgroup" for c in _V1_CONTROLLERS if c in m[3]}
        if all(c in v1 for c in _REQUIRED):
            controllers = tuple(c for c in _V1_CONTROLLERS if c in v1)
            parents = [_under_mount(v1[c][1], v1[c][2], own.get(c, "/")) for c in controllers]
            return cls._make([p / f"genesis-{os.getpid()}" for p in parents], False, controllers)
        unified = [m for m in mounts if m[0] == "cgroup2"]
        if not unified:
            raise CgroupUnavailable("no cgroup v2 tree and no v1 memory and pids hierarchies are mounted")
        _, point, root, _ = unified[0]
        parent = _under_mount(point, root, own.get("", "/"))
        available = (parent / "cgroup.controllers").read_text().split() if parent.is_dir() else []
        controllers = tuple(c for c in ("memory", "pids", "cpu") if c in available)
        if not all(c in controllers for c in _REQUIRED):
            raise CgroupUnavailable(f"the cgroup v2 tree at {parent} does not delegate memory and pids")
        _enable_v2_controllers(parent, controllers)
        return cls._make([parent / f"genesis-{os.getpid()}"], True, controllers)

    @classmethod
    def _make(cls, bases: list[Path], v2: bool, controllers: tuple[str, ...]) -> JobCgroups:
        try:
            for base in bases:
                sweep_stale(base.parent)
                base.mkdir(exist_ok=True)
                if v2:
                    _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
        except OSError as error:
            for base in bases:
                with contextlib.suppress(OSError):
                    base.rmdir()
            raise CgroupUnavailable(f"the cgroup tree is not writable here: {error}") from None
        return cls(bases, v2, controllers)

    def create(self, bounds: JobBounds) -> JobCgroup:
        name = f"job-{next(self._numbers)}"
        directories = [base / name for base in self.bases]
        job = JobCgroup(directories, self.v2)
        try:
            for directory in directories:
                directory.mkdir()
                self._limit(directory, bounds)
        except OSError:
            job.remove()
            raise
        return job

    def _limit(self, directory: Path, bounds: JobBounds) -> None:
        quota = max(1000, int(bounds.cpus * _CPU_PERIOD_US))
        if self.v2:
            _write(directory / "memory.max", str(bounds.memory_bytes))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: nothing to bound
                _write(directory / "memory.swap.max", "0")
            _write(directory / "pids.max", str(bounds.max_processes))
            if "cpu" in self.controllers:
                _write(directory / "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            return
        if (directory / "memory.limit_in_bytes").exists():
            # v1 counts TCP socket buffers apart, and only once they have a limit of their own: an eighth of
            # the job's bound goes to them, the rest to everything else, so the two together are the bound.
            tcp = bounds.memory_bytes // _TCP_SHARE
            _write(directory / "memory.limit_in_bytes", str(bounds.memory_bytes - tcp))
            with contextlib.suppress(FileNotFoundError):  # memory + swap, so swapping out is no way around it
                _write(directory / "memory.memsw.limit_in_bytes", str(bounds.memory_bytes - tcp))
            with contextlib.suppress(FileNotFoundError):  # kernels without v1 TCP accounting leave it out
                _write(directory / "memory.kmem.tcp.limit_in_bytes", str(tcp))
        if (directory / "pids.max").exists():
            _write(directory / "pids.max", str(bounds.max_processes))
        if (directory / "cpu.cfs_quota_us").exists():
            _write(directory / "cpu.cfs_period_us", str(_CPU_PERIOD_US))
            _write(directory / "cpu.cfs_quota_us", str(quota))


def _enable_v2_controllers(parent: Path, controllers: tuple[str, ...]) -> None:
    """v2 lets a cgroup hand controllers to children only while it holds no process itself ("no internal
    processes"), so Genesis first moves itself into a leaf of its own cgroup, as systemd's Delegate does."""
    enabled = (parent / "cgroup.subtree_control").read_text().split()
    if all(c in enabled for c in controllers):
        return
    leaf = parent / "genesis-service"
    try:
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
    except OSError as error:
        raise CgroupUnavailable(f"cannot delegate controllers below {parent}: {error}") from None

"""Test support for the Genesis sandbox: which tools a language needs, and what the host sees of a job.

A job's processes are told apart from everything else on the host without relying on the account they
run as (as root that is the sandbox uid, otherwise the tests' own uid): they are the launcher and bwrap
below the process that started them (Genesis, or this test process), and whatever runs in the pid
namespaces of their sandboxes. `JobWatch` samples them while jobs run, so a process that leaves its
parent is still known, and says afterwards whether any of them is still there.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from singularity_stack.genesis import sandbox
from singularity_stack.genesis.sandbox import probe_sandbox

# The interpreter each language needs on the host, and the Debian package that provides it.
TOOLS = {
    "python": ("python3", "python3"),
    "javascript": ("node", "nodejs"),
    "bash": ("bash", "bash"),
    "elixir": ("elixir", "elixir"),
}
LANGUAGES = sorted(TOOLS)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


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


# -- the host's process table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class HostProcess:
    ppid: int
    uid: int
    started: int  # clock ticks after boot: with the pid, names one process even once the pid is reused
    state: str  # "Z" for a zombie
    tasks: int  # threads: RLIMIT_NPROC and pids.max count every one
    held: int  # what it alone holds (anonymous and shared memory), not the libraries it shares
    pid_namespace: str | None  # None for a zombie: the kernel has dropped its namespaces
    cmdline: str
    name: str  # the kernel's name for it (comm), which a process may set itself

    @property
    def argv(self) -> list[str]:
        return self.cmdline.split(" ")


def _read_process(entry: Path) -> HostProcess | None:
    try:
        stat = (entry / "stat").read_text()
        status = (entry / "status").read_text()
        cmdline = (entry / "cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None  # exited while we looked
    try:
        namespace: str | None = os.readlink(entry / "ns" / "pid")
    except OSError:
        namespace = None
    after_name = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    held_kib = sum(int(fields.get(key, "0 kB").split()[0]) for key in ("RssAnon", "RssShmem"))
    return HostProcess(
        ppid=int(after_name[1]),
        uid=int(fields["Uid"].split()[0]),
        started=int(after_name[19]),
        state=after_name[0],
        tasks=int(fields.get("Threads", "1").split()[0]),
        held=held_kib * 1024,
        pid_namespace=namespace,
        cmdline=cmdline,
        name=fields.get("Name", "").strip(),
    )


def host_processes() -> dict[int, HostProcess]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (process := _read_process(entry)) is not None:
            found[int(entry.name)] = process
    return found


def host_pid_namespace() -> str:
    return os.readlink("/proc/self/ns/pid")


def _is_sandbox_frame(process: HostProcess, bwrap: str) -> bool:
    """The launcher, setpriv or bwrap of a job: each has bwrap's path on its command line."""
    return bwrap in process.argv or process.argv[0].endswith("/bwrap")


def job_processes(root: int | None = None, processes: dict[int, HostProcess] | None = None) -> dict[int, HostProcess]:
    """The processes of jobs started by `root` (this test process by default), as the host sees them: the
    launcher and bwrap below it, everything below those, and everything in their sandboxes' pid
    namespaces (a daemon that left its parent is still in there). Other processes of the machine, other
    test runs' jobs and Genesis's watchdog are not counted, whatever account they run as."""
    processes = host_processes() if processes is None else processes
    bwrap, host = sandbox.find_bwrap(), host_pid_namespace()
    below: set[int] = set()
    frontier = {root or os.getpid()}
    while frontier:
        below |= frontier
        frontier = {pid for pid, p in processes.items() if p.ppid in frontier} - below
    below.discard(root or os.getpid())
    frames = {pid for pid in below if _is_sandbox_frame(processes[pid], bwrap)}
    inside: set[int] = set()
    frontier = frames
    while frontier:
        inside |= frontier
        frontier = {pid for pid, p in processes.items() if p.ppid in frontier} - inside
    namespaces = {processes[pid].pid_namespace for pid in inside} - {host, None}
    return {pid: p for pid, p in processes.items() if pid in inside or p.pid_namespace in namespaces}


@dataclass
class JobWatch:
    """Every job process `root` starts, sampled from the host's process table while the watch runs.

    `seen` keeps each process ever observed (so one that left its parent, or outlived the job, is still
    known), `peak_tasks` the most tasks seen at once in each sandbox's pid namespace.
    """

    root: int | None = None
    interval_s: float = 0.01
    seen: dict[tuple[int, int], HostProcess] = field(default_factory=dict)  # (pid, started) -> process
    peak_tasks: dict[str, int] = field(default_factory=dict)
    last_seen: dict[str, int] = field(default_factory=dict)  # pid namespace -> clock ticks it was last seen at
    peak_cgroup_tasks: int = 0  # where jobs get a cgroup: the most tasks seen in one (pids.current)
    _task: asyncio.Task[None] | None = None

    def sample(self) -> dict[int, HostProcess]:
        now = _ticks_now()
        jobs = job_processes(self.root)
        tasks: dict[str, int] = {}
        for pid, process in jobs.items():
            self.seen.setdefault((pid, process.started), process)
            if process.pid_namespace not in (None, host_pid_namespace()):
                tasks[process.pid_namespace] = tasks.get(process.pid_namespace, 0) + process.tasks
        for namespace, count in tasks.items():
            self.peak_tasks[namespace] = max(self.peak_tasks.get(namespace, 0), count)
            self.last_seen[namespace] = now
        for job in job_cgroups_left():
            try:
                current = int((job / "pids.current").read_text())
            except (OSError, ValueError):
                continue  # not the pids hierarchy, or removed while we looked
            self.peak_cgroup_tasks = max(self.peak_cgroup_tasks, current)
        return jobs

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> JobWatch:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.sample()

    @property
    def namespaces(self) -> set[str]:
        return set(self.last_seen)

    def left_running(self) -> list[str]:
        """What of the watched jobs is still on the host: a process seen in a job (a zombie too), anything
        in a pid namespace of theirs, and any job process below `root` now."""
        now = host_processes()
        left = job_processes(self.root, now)
        for pid, process in now.items():
            if (pid, process.started) in self.seen:
                left[pid] = process
            elif process.pid_namespace in self.last_seen and process.started <= self.last_seen[process.pid_namespace]:
                left[pid] = process  # (a namespace's number is reused once it is gone: later processes are not ours)
        return [f"{pid} ({p.state}): {p.cmdline[:100]}" for pid, p in sorted(left.items())]


def _ticks_now() -> int:
    """Now, in the clock ticks after boot that /proc/<pid>/stat gives a process's start in."""
    return int(Path("/proc/uptime").read_text().split()[0].replace(".", "")) * _CLOCK_TICKS // 100 + 1


def job_cgroups_left() -> list[Path]:
    """Job cgroups of this process still on the host (none where jobs get no cgroup)."""
    tree = sandbox.job_cgroup_tree().tree
    return [job for base in tree.bases for job in base.glob("job-*")] if tree is not None else []


@pytest.fixture
async def job_watch() -> AsyncIterator[JobWatch]:
    async with JobWatch() as watch:
        yield watch


def assert_nothing_left_running(watch: JobWatch) -> None:
    """Once a job's result is back, nothing of it may remain, not even a zombie for the host's init, and
    its cgroup is gone. Fails when the watch saw no job at all: then it could not have seen a leak."""
    assert watch.seen, "the watch saw no job's processes, so it cannot vouch that none is left"
    assert watch.left_running() == []
    assert job_cgroups_left() == []

"""The Genesis sandbox's namespaces, its disk and its open files, judged from the host while a job holds them.

Each job does its part, then names itself `genesis-ready` (the host sees that in its process table) and
waits for SIGUSR1; meanwhile the test looks at the job's process from outside: its namespaces
(/proc/<pid>/ns), its working directory's filesystem (/proc/<pid>/root), its file descriptors and its
cgroup. None of it takes the job's word alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sandbox_support import JobWatch, assert_nothing_left_running, job_cgroups_left

from singularity_stack.genesis import sandbox
from singularity_stack.genesis.runner import JobOutcome, JobRunner, JobStatus
from singularity_stack.genesis.sandbox import SANDBOX_UID, Limits, MiB

pytestmark = pytest.mark.usefixtures("sandbox_ready")
READY_NAME = "genesis-ready"

# Prepended to each job: everything it needs to signal readiness is loaded before the job's own part runs
# (filling every file descriptor would stop a later import).
READY_PRELUDE = f"""\
import ctypes, errno, os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGUSR1}})
_libc = ctypes.CDLL(None, use_errno=True)

def ready():
    sys.stdout.flush()
    _libc.prctl(15, b"{READY_NAME}", 0, 0, 0)  # PR_SET_NAME: the host sees the job has done its part
    signal.sigwait({{signal.SIGUSR1}})  # the host has looked
"""


@dataclass
class HeldJob:
    pid: int  # the job's process, as the host numbers it
    outcome: JobOutcome | None = None


@contextlib.asynccontextmanager
async def job_holding_its_state(code: str, limits: Limits, watch: JobWatch) -> AsyncIterator[HeldJob]:
    """Runs `code` (after READY_PRELUDE) until it calls ready(); the body looks at it, then it is let go."""
    task = asyncio.get_running_loop().create_task(JobRunner(1, limits).run(READY_PRELUDE + code, "python"))
    deadline = time.monotonic() + limits.wall_time_s
    try:
        while not (ready := [pid for pid, p in watch.sample().items() if p.name == READY_NAME]):
            assert not task.done(), f"the job ended before it was ready: {task.result()}"
            assert time.monotonic() < deadline, "the job never got ready"
            await asyncio.sleep(0.02)
        held = HeldJob(ready[0])
        yield held
        os.kill(held.pid, signal.SIGUSR1)
        held.outcome = await task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(params=["on", "off"])
def proc_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(sandbox.PROC_ENV, request.param)
    return str(request.param)


# -- pid, ipc and cgroup namespaces --------------------------------------------------------------------

# SysV keys of this run (a segment left by another run must not decide anything): one the host creates,
# readable and writable by anyone, and one the job creates.
HOST_SEGMENT_KEY, JOB_KEY = (int.from_bytes(os.urandom(3)) << 4 | n for n in (1, 2))


@pytest.fixture
def host_shared_memory() -> Iterator[int]:
    """A SysV shared memory segment on the host, mode 0666: only the ipc namespace keeps a job from it."""
    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(HOST_SEGMENT_KEY, 4096, 0o1000 | 0o666)  # IPC_CREAT
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    yield shmid
    libc.shmctl(shmid, 0, None)  # IPC_RMID


@pytest.fixture
def host_victim() -> Iterator[subprocess.Popen[bytes]]:
    """A host process of the account the job runs as on the host: only the pid namespace keeps it from the job."""
    account = [] if os.geteuid() != 0 else [shutil.which("setpriv") or "setpriv", f"--reuid={SANDBOX_UID}"]
    victim = subprocess.Popen([*account, "sleep", "120"])
    yield victim
    victim.kill()
    victim.wait()


NAMESPACE_PROBE = """
found = [pid for pid in range(1, 32769) if pid != os.getpid() and _try_kill(pid)]
print("signalled", found)
try:
    os.kill(VICTIM, signal.SIGKILL)
    print("victim WORKED")
except ProcessLookupError:
    print("victim ESRCH")
segment = _libc.shmget(HOST_KEY, 0, 0)
print("host segment", "ENOENT" if segment == -1 and ctypes.get_errno() == errno.ENOENT else f"WORKED {segment}")
print("own segment", _libc.shmget(JOB_KEY, 4096, 0o1000 | 0o600) >= 0)
if os.path.exists("/proc/self/cgroup"):
    print("cgroups", sorted({line.split(":", 2)[2] for line in open("/proc/self/cgroup").read().splitlines()}))
ready()
"""
KILL_HELPER = """
def _try_kill(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
"""


def host_shared_memory_keys() -> set[int]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {int(line.split()[0]) for line in lines}


async def test_the_sandbox_has_its_own_pid_ipc_and_cgroup_namespaces(
    proc_mode: str, host_shared_memory: int, host_victim: subprocess.Popen[bytes], job_watch: JobWatch
) -> None:
    code = KILL_HELPER + NAMESPACE_PROBE
    code = code.replace("VICTIM", str(host_victim.pid)).replace("HOST_KEY", str(HOST_SEGMENT_KEY))
    code = code.replace("JOB_KEY", str(JOB_KEY))
    async with job_holding_its_state(code, Limits(wall_time_s=20), job_watch) as job:
        for kind in ("pid", "ipc", "cgroup", "net", "uts", "user", "mnt"):
            theirs, ours = os.readlink(f"/proc/{job.pid}/ns/{kind}"), os.readlink(f"/proc/self/ns/{kind}")
            assert theirs != ours, f"the job shares the host's {kind} namespace ({ours})"
        # The segment the job made lives in its namespace: the host's SysV table has only its own.
        keys = host_shared_memory_keys()
        assert HOST_SEGMENT_KEY in keys and JOB_KEY not in keys
    assert job.outcome is not None and job.outcome.status is JobStatus.OK, job.outcome
    lines = job.outcome.stdout.splitlines()
    signalled = [int(pid) for pid in lines[0].removeprefix("signalled [").rstrip("]").split(", ") if pid]
    # Only the sandbox's init and the job's parent shell are there to signal: nothing of the host.
    assert lines[0].startswith("signalled [") and len(signalled) <= 3 and max(signalled, default=1) < 16, lines
    assert lines[1:4] == ["victim ESRCH", "host segment ENOENT", "own segment True"], lines
    if proc_mode == "on":  # its own cgroup is the root of all it sees: no host path leaks
        assert lines[4] == "cgroups ['/']", lines
    assert host_victim.poll() is None, "the host process the job aimed at is gone"
    assert_nothing_left_running(job_watch)


# -- the working directory is a 32 MiB tmpfs -----------------------------------------------------------

FILL_THE_DISK = """
written, failure = 0, "none"
chunk = b"x" * (1024 * 1024)
for n in range(5):  # 5 files of 8 MiB: 40 MiB, each under the 10 MB file size limit
    fd = os.open(f"/tmp/fill-{n}", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(8):
            written += os.write(fd, chunk)
    except OSError as error:
        failure = errno.errorcode[error.errno]
        break
    finally:
        os.close(fd)
print("wrote", written, failure)
ready()
"""


async def test_the_working_directory_is_a_32_mib_tmpfs(job_watch: JobWatch) -> None:
    limits = Limits()
    assert limits.workdir_bytes == 32 * MiB  # the README's figure is the default
    async with job_holding_its_state(FILL_THE_DISK, limits, job_watch) as job:
        disk = os.statvfs(f"/proc/{job.pid}/root/box")  # the job's /box (its /tmp), from outside
        size, used = disk.f_blocks * disk.f_frsize, (disk.f_blocks - disk.f_bfree) * disk.f_frsize
        charged = job_shared_memory()
    assert job.outcome is not None and job.outcome.status is JobStatus.OK, job.outcome
    words = job.outcome.stdout.split()
    assert words[0] == "wrote" and words[2] == "ENOSPC", job.outcome.stdout
    assert 31 * MiB < int(words[1]) <= 32 * MiB, words
    assert size == 32 * MiB and 31 * MiB < used <= 32 * MiB, (size, used)
    if charged is not None:  # the files are RAM: the job's cgroup holds them, and no more
        assert 31 * MiB < charged <= 32 * MiB + sandbox._DEV_SHM_BYTES, charged
    assert_nothing_left_running(job_watch)


def job_shared_memory() -> int | None:
    """Bytes of shared memory (tmpfs files included) charged to the running job's cgroup, where it has one."""
    for job in job_cgroups_left():
        with contextlib.suppress(FileNotFoundError):
            for line in (job / "memory.stat").read_text().splitlines():
                key, value = line.split()
                if key == "shmem":
                    return int(value)
    return None


# -- open files ------------------------------------------------------------------------------------------

OPEN_EVERYTHING = """
last, failure = -1, "none"
try:
    for _ in range(100_000):
        last = os.open("/dev/null", os.O_RDONLY)
except OSError as error:
    failure = errno.errorcode[error.errno]
print("last fd", last, failure)
ready()
"""


async def test_open_files_are_capped_at_256_per_process(job_watch: JobWatch) -> None:
    limits = Limits()
    assert limits.max_open_files == 256  # the README's figure is the default
    async with job_holding_its_state(OPEN_EVERYTHING, limits, job_watch) as job:
        held = len(os.listdir(f"/proc/{job.pid}/fd"))  # counted by the host, not by the job
        cap = next(line for line in Path(f"/proc/{job.pid}/limits").read_text().splitlines() if "open files" in line)
    assert job.outcome is not None and job.outcome.status is JobStatus.OK, job.outcome
    assert job.outcome.stdout.split() == ["last", "fd", "255", "EMFILE"], job.outcome.stdout
    assert held == 256, held
    assert cap.split()[3:5] == ["256", "256"], cap
    assert_nothing_left_running(job_watch)


# -- the stated limits, as the host sees them on a running job --------------------------------------------

LOWER_OWN_OOM_SCORE = """
try:
    with open("/proc/self/oom_score_adj", "w") as handle:
        handle.write("0")
    print("lowered")
except OSError as error:
    print(errno.errorcode[error.errno])
ready()
"""
RLIMITS = {  # /proc/<pid>/limits: the README's figures, soft and hard
    "Max cpu time": ["5", "6"],
    "Max data size": [str(256 * MiB)] * 2,
    "Max file size": [str(10 * MiB)] * 2,
    "Max processes": ["64", "64"],
    "Max open files": ["256", "256"],
    "Max core file size": ["0", "0"],
}


def rlimits_of(pid: int) -> dict[str, list[str]]:
    found = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        name = line[:26].strip()
        if name in RLIMITS:
            found[name] = line[26:].split()[:2]
    return found


def holds_cap_sys_resource() -> bool:
    """Whether this process (Genesis here) may set an oom_score_adj floor: root without it may not."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return bool(int(status["CapEff"], 16) >> 24 & 1)  # CAP_SYS_RESOURCE is capability 24


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def cgroup_values(job: Path) -> dict[str, str]:
    names = ("memory.max", "memory.limit_in_bytes", "memory.kmem.tcp.limit_in_bytes", "pids.max")
    names += ("cpu.max", "cpu.cfs_quota_us", "cpu.cfs_period_us")
    return {name: (job / name).read_text().strip() for name in names if (job / name).exists()}


async def test_the_stated_limits_are_in_force_on_every_process_of_a_job(
    job_watch: JobWatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defaults the README states, read from the host on the job, its sandbox's init and bwrap."""
    monkeypatch.setenv(sandbox.PROC_ENV, "on")  # the job writes its own /proc/self/oom_score_adj
    async with job_holding_its_state(LOWER_OWN_OOM_SCORE, Limits(), job_watch) as job:
        processes = job_watch.sample()
        init = processes[job.pid].ppid
        bwrap = processes[init].ppid
        assert processes[bwrap].argv[0].endswith("/bwrap"), processes[bwrap]
        limits = {pid: rlimits_of(pid) for pid in (job.pid, init)}
        scores = {name: oom_score_adj(pid) for name, pid in (("job", job.pid), ("init", init), ("bwrap", bwrap))}
        cgroups = {pid: Path(f"/proc/{pid}/cgroup").read_text() for pid in (job.pid, init, bwrap)}
        bounds = {job_dir: cgroup_values(job_dir) for job_dir in job_cgroups_left()}  # per hierarchy on v1
    assert job.outcome is not None and job.outcome.status is JobStatus.OK, job.outcome
    # CPU 5 s (SIGKILL a second later), data 256 MiB, 64 processes, files of 10 MiB, 256 open files, no core
    # dumps: on the job and on the init that runs it.
    assert limits == {job.pid: RLIMITS, init: RLIMITS}, limits
    # First for the OOM killer. A job may lower its own value only to Genesis's floor: 1000 where Genesis holds
    # CAP_SYS_RESOURCE (the launcher's write then sets the floor too), 0 otherwise (root in a container that
    # drops it, or any other account); its init and bwrap keep 1000 either way.
    held = holds_cap_sys_resource()
    assert job.outcome.stdout.strip() == ("EACCES" if held else "lowered"), job.outcome
    assert scores == {"job": 1000 if held else 0, "init": 1000, "bwrap": 1000}, scores
    tree = sandbox.job_cgroup_tree().tree
    if tree is None:
        return  # no cgroup per job here (the README's second row): the rlimits above are the bound
    # The whole job: 512 MiB (on v1 an eighth of it for TCP buffers), 64 tasks, one CPU; bwrap, the init
    # and the job are all inside that one cgroup.
    (name,) = {job_dir.name for job_dir in bounds}
    assert all(f"/genesis-{os.getpid()}/{name}\n" in text for text in cgroups.values()), cgroups
    merged = {key: value for values in bounds.values() for key, value in values.items()}
    assert merged["pids.max"] == "64", merged
    if tree.v2:
        assert merged["memory.max"] == str(512 * MiB), merged
        cpu = merged.get("cpu.max")
    else:
        assert merged["memory.limit_in_bytes"] == str(512 * MiB - 64 * MiB), merged
        assert merged.get("memory.kmem.tcp.limit_in_bytes", str(64 * MiB)) == str(64 * MiB), merged
        cpu = f"{merged['cpu.cfs_quota_us']} {merged['cpu.cfs_period_us']}" if "cpu.cfs_quota_us" in merged else None
    if "cpu" in tree.controllers:
        assert cpu == "100000 100000", merged

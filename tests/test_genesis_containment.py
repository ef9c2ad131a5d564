"""Hostile jobs against the Genesis sandbox, in every language and both /proc modes, judged from the host.

Each attack is what a job written by an attacker would try: take over the sandbox's init (ptrace,
process_vm_*, /proc/1/mem, signals), hold memory the per-process limits do not see (child processes,
memfds), outlive the job or Genesis itself, or print bytes that break the reply. What counts is what
the host sees (its process table, the memory of the job's processes, the job's cgroup) and what the
requester receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sandbox_support import (
    LANGUAGES,
    HostProcess,
    JobWatch,
    assert_nothing_left_running,
    job_processes,
    require_language,
)

from singularity_stack.genesis import sandbox, seccomp
from singularity_stack.genesis.cgroups import JobCgroups
from singularity_stack.genesis.cgroups import remove as remove_cgroup_tree
from singularity_stack.genesis.runner import NUL_STANDIN, JobRunner, JobStatus
from singularity_stack.genesis.sandbox import Limits, MiB

pytestmark = pytest.mark.usefixtures("sandbox_ready")
PROC_MODES = ["on", "off"]


@pytest.fixture(params=PROC_MODES)
def proc_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(sandbox.PROC_ENV, request.param)
    return str(request.param)


def in_every_language(python_code: str, language: str) -> str:
    """A job in `language` whose attack runs as a Python child process, as any job may start one."""
    if language == "python":
        return python_code
    if language == "bash":
        return f"python3 - <<'PAYLOAD'\n{python_code}\nPAYLOAD\necho job-exit $?\n"
    if language == "javascript":
        return (
            "const r = require('child_process').spawnSync('python3', ['-c', "
            f"{json.dumps(python_code)}], {{stdio: 'inherit'}});\nconsole.log('job-exit', r.status);\n"
        )
    # elixir: ~S is a sigil without interpolation or escapes, so the code passes as it is
    assert '"""' not in python_code
    return (
        f'code = ~S"""\n{python_code}\n"""\n'
        'port = Port.open({:spawn_executable, "/usr/bin/python3"}, [:binary, :exit_status, args: ["-c", code]])\n'
        "loop = fn loop -> receive do\n"
        "  {^port, {:data, data}} -> IO.write(data); loop.(loop)\n"
        '  {^port, {:exit_status, status}} -> IO.puts("job-exit #{status}")\n'
        "end end\nloop.(loop)\n"
    )


# -- the sandbox's init cannot be taken over ---------------------------------------------------------

TAKE_OVER_INIT = r"""
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)

def attempt(name, result):
    print(name, "refused" if result == -1 else f"WORKED {result}", flush=True)

attempt("ptrace-attach", libc.ptrace(16, 1, 0, 0))  # PTRACE_ATTACH to the sandbox's pid 1
attempt("ptrace-seize", libc.ptrace(0x4206, 1, 0, 0))  # PTRACE_SEIZE
buf = ctypes.create_string_buffer(16)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
local, remote = iovec(ctypes.addressof(buf), 16), iovec(0x400000, 16)
attempt("process_vm_readv", libc.process_vm_readv(1, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
if os.path.exists("/proc/1"):
    for name in ("mem", "environ", "maps"):
        try:
            with open(f"/proc/1/{name}", "rb") as handle:
                handle.read(1)
            print(f"/proc/1/{name} WORKED", flush=True)
        except OSError:
            print(f"/proc/1/{name} refused", flush=True)
for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):
    os.kill(1, sig)
print("init survived", flush=True)
"""


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_job_cannot_take_over_the_sandbox_init(language: str, proc_mode: str) -> None:
    require_language(language)
    outcome = await JobRunner(1, Limits(wall_time_s=20)).run(in_every_language(TAKE_OVER_INIT, language), language)
    lines = outcome.stdout.splitlines()
    assert "WORKED" not in outcome.stdout, outcome
    expected = ["ptrace-attach refused", "ptrace-seize refused", "process_vm_readv refused"]
    if proc_mode == "on":
        expected += ["/proc/1/mem refused", "/proc/1/environ refused", "/proc/1/maps refused"]
    assert lines[: len(expected) + 1] == [*expected, "init survived"], outcome
    assert outcome.status is JobStatus.OK, outcome


KERNEL_SURFACES = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NUMBERS = NUMBERS_HERE  # this machine's system call numbers, from the filter's own table
# Each with arguments the kernel would accept or reject with something other than EPERM.
calls = {
    "ptrace": (0, 0, 0, 0),  # PTRACE_TRACEME
    "process_vm_readv": (os.getpid(), 0, 0, 0, 0, 0),
    "kcmp": (os.getpid(), os.getpid(), 0, 0, 0),
    "memfd_create": (ctypes.c_char_p(b"x"), 0),
    "userfaultfd": (0,),
    "io_uring_setup": (1, 0),
    "keyctl": (0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "bpf": (9999, 0, 0),
    "perf_event_open": (0, 0, -1, -1, 0),
}
for name, args in calls.items():
    result = libc.syscall(NUMBERS[name], *args)
    code = ctypes.get_errno()
    print(name, "EPERM" if result == -1 and code == errno.EPERM else f"allowed ({result}, {errno.errorcode.get(code)})")
"""


async def test_kernel_surfaces_a_job_has_no_use_for_are_refused(proc_mode: str) -> None:
    column = {"x86_64": 0, "aarch64": 1}[os.uname().machine]  # the ABIs the filter knows
    numbers = {name: pair[column] for name, pair in seccomp.DENIED.items()}
    outcome = await JobRunner(1).run(KERNEL_SURFACES.replace("NUMBERS_HERE", repr(numbers)), "python")
    assert outcome.status is JobStatus.OK, outcome
    results = dict(line.split(" ", 1) for line in outcome.stdout.splitlines())
    assert results == dict.fromkeys(results, "EPERM") and len(results) == 9, results


SOCKETS_AND_MAPPINGS = r"""
import errno, mmap, socket
for name in ("AF_VSOCK", "AF_PACKET", "AF_ALG", "AF_BLUETOOTH"):
    try:
        socket.socket(getattr(socket, name), socket.SOCK_STREAM if name != "AF_PACKET" else socket.SOCK_RAW)
        print(name, "WORKED")
    except OSError as error:
        print(name, errno.errorcode[error.errno])
for name in ("AF_UNIX", "AF_INET", "AF_INET6"):
    socket.socket(getattr(socket, name), socket.SOCK_STREAM).close()
    print(name, "works")
try:  # the kernel counts a MAP_GROWSDOWN mapping as stack: RLIMIT_DATA would not see it
    mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100)
    print("MAP_GROWSDOWN WORKED")
except OSError as error:
    print("MAP_GROWSDOWN", errno.errorcode[error.errno])
"""


async def test_only_isolated_socket_families_and_counted_mappings(proc_mode: str) -> None:
    """AF_VSOCK has no network namespace: a job could reach the hypervisor's port space through it."""
    outcome = await JobRunner(1).run(SOCKETS_AND_MAPPINGS, "python")
    assert outcome.stdout.splitlines() == [
        "AF_VSOCK EAFNOSUPPORT",
        "AF_PACKET EAFNOSUPPORT",
        "AF_ALG EAFNOSUPPORT",
        "AF_BLUETOOTH EAFNOSUPPORT",
        "AF_UNIX works",
        "AF_INET works",
        "AF_INET6 works",
        "MAP_GROWSDOWN EPERM",
    ], outcome


# -- memory, processes and CPU are bounded for the job as a whole -------------------------------------

HOLDER = (
    "import time; b = bytearray({size}); b[::4096] = b'x' * len(b[::4096]); print('held', flush=True); time.sleep(8)"
)
MEMORY_HOGS = {
    # Four children of 100 MiB each: under every process's own limits, 400 MiB for the job.
    "python": (
        "import subprocess\n"
        "procs = [subprocess.Popen(['python3', '-c', {holder!r}]) for _ in range(4)]\n"
        "for p in procs: p.wait()\n"
    ),
    "bash": "for i in 1 2 3 4; do python3 -c {holder_sh} & done\nwait\n",
    "javascript": (
        "const {{ spawn }} = require('child_process');\n"
        "for (let i = 0; i < 4; i++) spawn('node', ['-e', "
        "'const b = Buffer.alloc(100 * 1024 * 1024, 1); console.log(\"held\"); setTimeout(() => b, 8000)'], "
        "{{stdio: 'inherit'}});\n"
    ),
    "elixir": (
        "holder = {holder_ex}\n"
        'spawn = fn -> Port.open({{:spawn_executable, "/usr/bin/python3"}}, [:exit_status, args: ["-c", holder]]) end\n'
        "ports = for _ <- 1..4, do: spawn.()\n"
        "for port <- ports, do: (receive do {{^port, {{:exit_status, _}}}} -> :ok end)\n"
    ),
}
JOB_BOUND = 192 * MiB


def memory_hog(language: str) -> str:
    holder = HOLDER.format(size=100 * MiB)
    return MEMORY_HOGS[language].format(holder=holder, holder_sh=f"'{holder}'", holder_ex=json.dumps(holder))


class PeakSampler:
    """The largest total memory held by this test's job processes, sampled from the host while a job runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, sum(p.held for p in job_processes().values()))
            await asyncio.sleep(0.02)

    def __enter__(self) -> PeakSampler:
        self._task = asyncio.get_running_loop().create_task(self._sample())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def require_job_cgroups() -> None:
    if sandbox.job_cgroup_tree().tree is None:
        pytest.skip(f"NEEDS A WRITABLE CGROUP TREE (root, or a delegated v2 tree): {sandbox.job_bounds_in_force()}")


@pytest.mark.parametrize("language", LANGUAGES)
async def test_memory_is_bounded_for_the_job_as_a_whole(language: str, proc_mode: str) -> None:
    require_language(language)
    require_job_cgroups()
    limits = Limits(wall_time_s=20, memory_bytes=160 * MiB, job_memory_bytes=JOB_BOUND)
    with PeakSampler() as sampler:
        outcome = await JobRunner(1, limits).run(memory_hog(language), language)
    assert outcome.status is JobStatus.MEMORY_LIMIT, outcome
    assert sampler.peak < JOB_BOUND + 16 * MiB, f"the job's processes held {sampler.peak // MiB} MiB"
    assert job_processes() == {}


async def test_memory_in_files_and_shared_memory_counts_against_the_job() -> None:
    """tmpfs pages (/box, /dev/shm) belong to no process's rlimit; the job's cgroup counts them."""
    require_job_cgroups()
    code = textwrap.dedent(
        """
        import mmap
        chunks = []
        for i in range(12):
            m = mmap.mmap(-1, 16 * 1024 * 1024, flags=mmap.MAP_SHARED)
            m.write(b"x" * len(m))
            chunks.append(m)
        with open("/box/fill", "wb") as f:
            f.write(b"y" * 30 * 1024 * 1024)
        print("held all", flush=True)
        """
    )
    limits = Limits(memory_bytes=256 * MiB, job_memory_bytes=96 * MiB, workdir_bytes=32 * MiB)
    outcome = await JobRunner(1, limits).run(code, "python")
    assert outcome.status is JobStatus.MEMORY_LIMIT, outcome
    assert "held all" not in outcome.stdout


LOOPBACK_TCP_HOARD = r"""
import os, socket, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1024)
for _ in range(3):
    if os.fork() == 0:
        held = []
        for _ in range(60):  # fill every connection's buffers and never read them
            client = socket.create_connection(server.getsockname())
            peer, _ = server.accept()
            client.setblocking(False)
            try:
                while client.send(b"x" * 262144):
                    pass
            except OSError:
                pass
            held.append((client, peer))
        time.sleep(4)
        os._exit(0)
os.wait(); os.wait(); os.wait()
print("done", flush=True)
"""


def host_tcp_memory() -> int:
    """Bytes of socket buffers TCP holds on the whole host (/proc/net/sockstat counts pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    raise AssertionError("no TCP line in /proc/net/sockstat")


async def test_socket_buffers_count_against_the_job() -> None:
    """cgroup v1 leaves TCP buffers out of a job's memory unless they have a limit of their own."""
    require_job_cgroups()
    before, peak = host_tcp_memory(), 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, host_tcp_memory() - before)
            await asyncio.sleep(0.02)

    sampler = asyncio.get_running_loop().create_task(sample())
    try:
        outcome = await JobRunner(1, Limits(wall_time_s=20, job_memory_bytes=64 * MiB)).run(
            LOOPBACK_TCP_HOARD, "python"
        )
    finally:
        sampler.cancel()
    assert outcome.status in (JobStatus.OK, JobStatus.MEMORY_LIMIT), outcome
    assert peak < 64 * MiB, f"the job's sockets held {peak // MiB} MiB of the host's TCP memory"


FORGED_SETUP_FAILURE = r"""
import sys, time
sys.stderr.write("bwrap: Can't mount proc on /newroot/proc: Operation not permitted\n")
sys.stderr.flush()
time.sleep(30)
"""


async def test_a_sandbox_killed_under_the_job_is_the_jobs_result_not_a_setup_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The OOM killer may pick bwrap itself in the job's cgroup. That must come back as the job's result:
    never as a "sandbox failure" carrying the job's words, which once also switched /proc off for good."""
    monkeypatch.setattr(sandbox, "_proc_refused", False)
    monkeypatch.delenv(sandbox.PROC_ENV, raising=False)
    job = asyncio.get_running_loop().create_task(
        JobRunner(1, Limits(wall_time_s=20)).run(FORGED_SETUP_FAILURE, "python")
    )

    def run_phase_monitors() -> list[int]:
        """The job's bwrap (one sandbox for all its phases; the program's words below say the run is on)."""
        return [pid for pid, p in job_processes().items() if p.argv[0].endswith("/bwrap")]

    def forged_message_written() -> bool:
        """The job's program has written its words (the kernel's count of what it wrote, read from the host)."""
        processes = job_processes().items()
        programs = [pid for pid, p in processes if p.name == "python3" and p.cmdline.endswith("python3 -u main.py")]
        for pid in programs:
            with contextlib.suppress(OSError):
                written = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
                return int(written["wchar"]) >= len("bwrap: Can't mount proc")
        return False

    deadline = time.monotonic() + 30
    while not ((monitors := run_phase_monitors()) and forged_message_written()):
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.05)
    try:
        os.kill(monitors[0], signal.SIGKILL)  # what the OOM killer does when it picks bwrap
    finally:
        outcome = await job
    assert outcome.status is JobStatus.TIMEOUT and outcome.exit_code is None, outcome  # killed, as by a limit
    assert sandbox._proc_refused is False
    assert job_processes() == {}


async def test_the_bound_in_force_is_stated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sandbox.job_bounds_in_force().startswith(("a cgroup per job", "no cgroup per job"))
    monkeypatch.setattr(sandbox, "_job_cgroup_tree", None)
    monkeypatch.setenv("GENESIS_SANDBOX_CGROUP", "off")
    stated = sandbox.job_bounds_in_force()
    assert "no cgroup per job (GENESIS_SANDBOX_CGROUP=off)" in stated and "oom_score_adj 1000" in stated
    outcome = await JobRunner(1).run("print(open('/proc/self/oom_score_adj').read())", "python")
    assert outcome.stdout.strip() == "1000", outcome  # first in line for the OOM killer, in either mode


# -- nothing of a job outlives it, or Genesis ---------------------------------------------------------

DAEMON = r"""
import ctypes, os, signal, sys, time
libc = ctypes.CDLL(None, use_errno=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        libc.prctl(1, 0)  # PR_SET_PDEATHSIG: none
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        os.closerange(0, 3)
        while True:
            time.sleep(0.1)
    os._exit(0)
print("daemonised", flush=True)
{tail}
"""


@pytest.mark.parametrize("language", LANGUAGES)
async def test_a_daemon_left_behind_is_gone_when_the_job_ends(language: str, proc_mode: str) -> None:
    require_language(language)
    async with JobWatch() as watch:
        outcome = await JobRunner(1, Limits(wall_time_s=20)).run(
            in_every_language(DAEMON.format(tail=""), language), language
        )
    assert "daemonised" in outcome.stdout, outcome
    assert_nothing_left_running(watch)


def daemon_detached(processes: dict[int, HostProcess]) -> bool:
    """The daemon's parent has exited, so the sandbox's init holds it besides the job's program."""
    inits = [pid for pid, p in processes.items() if p.cmdline.startswith(sandbox.INIT_PATH)]
    return any(sum(p.ppid == init for p in processes.values()) >= 2 for init in inits)


GENESIS_STAND_IN = """
import asyncio, sys
from singularity_stack.genesis.runner import JobRunner
from singularity_stack.genesis.sandbox import Limits
asyncio.run(JobRunner(1, Limits(wall_time_s=120, cpu_time_s=100)).run(sys.stdin.read(), sys.argv[1]))
"""


@pytest.fixture
def genesis_process() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


@pytest.mark.parametrize("cgroups", ["auto", "off"])
@pytest.mark.parametrize("language", LANGUAGES)
async def test_every_process_of_a_job_dies_with_genesis_even_by_sigkill(
    language: str, proc_mode: str, cgroups: str, genesis_process: list[subprocess.Popen[bytes]]
) -> None:
    require_language(language)
    if cgroups == "auto":
        require_job_cgroups()  # otherwise it is the "off" case again
    code = in_every_language(DAEMON.format(tail="time.sleep(100)"), language)
    env = {**os.environ, "GENESIS_SANDBOX_CGROUP": cgroups}
    process = subprocess.Popen([sys.executable, "-c", GENESIS_STAND_IN, language], stdin=subprocess.PIPE, env=env)
    genesis_process.append(process)
    assert process.stdin is not None
    process.stdin.write(code.encode())
    process.stdin.close()
    watch = JobWatch(root=process.pid)
    deadline = time.monotonic() + 30
    while not any("main." in p.cmdline for p in watch.sample().values()):
        assert time.monotonic() < deadline, "the job never started"
        await asyncio.sleep(0.05)
    while not daemon_detached(seen := watch.sample()):
        assert time.monotonic() < deadline, f"the daemon never detached: {seen}"
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 5
    while left := watch.left_running():
        assert time.monotonic() < deadline, f"left running after Genesis died: {left}"
        await asyncio.sleep(0.05)
    tree = sandbox.job_cgroup_tree().tree
    leftover = [base.parent / f"genesis-{process.pid}" for base in tree.bases] if tree else []
    deadline = time.monotonic() + 5
    while leftover := [p for p in leftover if p.exists()]:
        assert time.monotonic() < deadline, f"job cgroups left behind: {leftover}"
        await asyncio.sleep(0.05)


def test_the_next_genesis_removes_the_job_cgroups_a_dead_one_left() -> None:
    """A Genesis killed before its watchdog could act leaves `genesis-<pid>/job-N` behind, maybe with a
    process in it: the next Genesis on the host (a fresh detect) kills what is there and removes them."""
    require_job_cgroups()
    tree = sandbox.job_cgroup_tree().tree
    assert tree is not None
    gone = subprocess.Popen(["true"])
    gone.wait()  # a Genesis that is gone: its pid names no process now
    stale = [base.parent / f"genesis-{gone.pid}" / "job-1" for base in tree.bases]
    survivor = subprocess.Popen(["sleep", "120"])  # what a job of it left running
    try:
        for job in stale:
            job.mkdir(parents=True)
            (job / "cgroup.procs").write_text(str(survivor.pid))
        JobCgroups.detect()
        assert survivor.wait(timeout=10) == -signal.SIGKILL
        assert [job.parent for job in stale if job.parent.exists()] == []
    finally:
        survivor.kill()
        survivor.wait()
        for job in stale:
            remove_cgroup_tree(job.parent)


# -- whatever a job prints comes back ---------------------------------------------------------------

PRINT_HOSTILE_BYTES = {
    "python": "import sys\nsys.stdout.buffer.write(b'a\\x00b\\xff\\x01\\x1b[2Jc\\n')\nsys.stderr.buffer.write(b'\\0')",
    "bash": "printf 'a\\000b\\377\\001\\033[2Jc\\n'; printf '\\000' >&2",
    "javascript": (
        "process.stdout.write(Buffer.from([0x61, 0, 0x62, 0xff, 1, 0x1b, 0x5b, 0x32, 0x4a, 0x63, 10]));"
        "process.stderr.write(Buffer.from([0]));"
    ),
    "elixir": 'IO.binwrite(<<?a, 0, ?b, 0xFF, 1, 0x1B, "[2Jc\\n">>); IO.binwrite(:stderr, <<0>>)',
}


@pytest.mark.parametrize("language", LANGUAGES)
async def test_any_bytes_a_job_prints_come_back_as_text(language: str) -> None:
    require_language(language)
    outcome = await JobRunner(1).run(PRINT_HOSTILE_BYTES[language], language)
    invalid = "\u00ff" if language == "elixir" else "\ufffd"  # the BEAM's stdio writes 0xFF as UTF-8 "ÿ"
    assert outcome.stdout == f"a{NUL_STANDIN}b{invalid}\x01\x1b[2Jc\n", outcome
    assert outcome.stderr == NUL_STANDIN, outcome

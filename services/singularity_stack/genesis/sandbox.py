"""Run untrusted processes in isolation: bubblewrap namespaces, a cgroup per job, rlimits, a seccomp
filter; output capped as it streams. A job's phases (syntax check, lint, run) share one sandbox
(JobSandbox), one after another, each reported on its own; `run_sandboxed` runs a single program.

Isolation (bubblewrap, `bwrap`):
- new user, pid, net, ipc, uts and cgroup namespaces; no network: only the sandbox's own loopback;
- a fresh root holding only a read-only /usr (plus the /bin, /lib… links), a few harmless /etc files,
  a new /proc and a minimal /dev. Nothing of /etc/shadow, /root, /work or the host's /tmp is mounted;
- the only writable place is /box, a size-capped tmpfs that is the job's own temporary directory
  (/tmp links to it); the source file is copied in from a memfd, so no host file is ever shared;
- an empty environment except PATH/HOME/LANG/TMPDIR and what the language needs;
- a seccomp filter (seccomp.py) on every process of the sandbox: no ptrace, no process_vm_*, no new
  user namespaces, no memfds (unless the runtime needs them), no bpf, io_uring, keyring, mounts…

The sandbox's pid 1 is a tiny init (`dash`) that runs the job's phases as its children, one after
another, and exits with the last one's status; when it dies the kernel kills every process in the pid
namespace. A job must not be able to take it over (attach to it, write its memory, clear its
parent-death signal), so it is copied into the sandbox execute-only: the kernel marks a process exec'ed from a
file it may not read non-dumpable, and nobody without CAP_SYS_PTRACE may then ptrace it or open its
/proc/1/mem. It runs under the job's rlimits too: nothing in the sandbox runs outside the limits.

Limits, for the job as a whole: a cgroup per job (cgroups.py) bounds memory (every page: heaps,
shared memory, memfds, tmpfs contents, socket buffers), tasks and CPU bandwidth, where the host has a
writable cgroup tree. Per process, everywhere: CPU time, data size, processes, file size and open
files are rlimits the sandbox's init sets on itself (dash's `ulimit`) before it starts anything, so
they bind it and all it starts (python and bash programs also get an address-space limit of their
own). Every process of the sandbox starts with oom_score_adj 1000, so if memory runs out the kernel
kills a job before anything else (that is the memory bound where no cgroup is available: the host's
or the Pod's limit). A job may lower its own
value only as far as Genesis's floor (0, unless Genesis holds CAP_SYS_RESOURCE, which makes 1000 the
floor); the init and bwrap keep 1000, so a host-wide OOM still ends the job. Wall time and the output
caps are enforced here, by killing the job.

A job's processes cannot outlive it: the cgroup is emptied when the job ends, pid 1's death takes
the namespace down, bwrap's `--die-with-parent` ends the sandbox if Genesis dies, and the watchdog
(watchdog.py) empties every job cgroup when Genesis is gone, even after a SIGKILL.

Why the job runs as a real unprivileged uid: RLIMIT_NPROC is never enforced for the host's root user
(kernel/fork.c exempts INIT_USER), and a uid that is only 65534 *inside* a user namespace is still
root outside. So when the service runs as root, bwrap is started as nobody (65534, via util-linux
`setpriv`, after the launcher has moved itself into the job's cgroup as root) and creates the user
namespace unprivileged. Since Linux 5.14 the process count lives in
per-user-namespace ucounts, so concurrent jobs sharing that uid each get their own `max_processes`
budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import seccomp
from .cgroups import CgroupUnavailable, JobBounds, JobCgroup, JobCgroups
from .phase_output import PhasedStream

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

SANDBOX_UID = 65534  # "nobody": an unprivileged uid, see the module docstring for why it matters
WORKDIR = "/box"  # the job's writable temporary directory inside the sandbox
TOOLS_DIR = "/opt/genesis/bin"  # where host tools (linters) are bind-mounted read-only
INIT_PATH = "/opt/genesis/init"  # the sandbox's pid 1, copied in execute-only (module docstring)
SANDBOX_PATH = "/usr/bin:/bin"  # not /usr/local: interpreters are the distribution's

_DEV_SHM_BYTES = 4 * MiB  # POSIX semaphores/shm need a little; tmpfs is RAM not covered by RLIMIT_DATA
_READ_CHUNK = 64 * KiB
_REAP_GRACE_S = 5.0  # after SIGKILL the namespace is torn down by the kernel; this is only a safety net
# The sandbox's pid 1 (bwrap --as-pid-1 execs it) runs the job's phases as its children, one after another
# (_init_script), and exits with the last one's status (128+N for signal N). Being init, it also reaps
# the job's orphans. bwrap's own init would do that too, but bwrap exits without waiting for it, leaving
# a zombie for the host's init.
# Runs as Genesis, before bwrap: marks everything that follows first in line for the OOM killer, moves
# itself into the job's cgroups (each file named before "--"), then execs the rest (setpriv, then bwrap).
# Nothing of the job exists yet, so nothing can start outside the cgroup. (Spawning it as nobody directly
# would cost a full fork of Genesis, whose page tables grow with its memory: subprocess uses vfork only
# when it changes no uid.)
_LAUNCHER = (
    "/bin/sh",
    "-c",
    "echo 1000 > /proc/self/oom_score_adj || exit 120\n"
    'while [ "$1" != -- ]; do echo 0 > "$1" || exit 121; shift; done\n'
    'shift\nexec "$@"',
    "genesis-launch",
)
_LAUNCH_FAILURES = {
    120: "could not set the job's oom_score_adj",
    121: "could not move the job into its cgroup",
    123: "could not set the job's rlimits",
}

# Host directories the interpreters need; on merged-/usr Debian the ones besides /usr are symlinks.
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The only /etc entries visible to jobs: loader config and alternatives symlinks, never credentials.
_ETC_ALLOWLIST = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
)
# bwrap's own environment: it never needs the service's (secret-bearing) variables.
_BWRAP_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (missing tool, namespaces refused): not the job's fault."""


@dataclass(frozen=True)
class Limits:
    """Per-process resource limits of one sandboxed run. Defaults follow Judge0/Piston."""

    wall_time_s: float = 10.0
    cpu_time_s: int = 5
    # RLIMIT_DATA (heap and other private writable memory); see languages.py for RLIMIT_AS.
    memory_bytes: int = 256 * MiB
    max_processes: int = 64  # RLIMIT_NPROC: processes *and threads* of the job's user namespace
    max_file_bytes: int = 10 * MiB  # RLIMIT_FSIZE: largest file the job may write
    max_output_bytes: int = 64 * KiB  # cap of stdout and of stderr, each
    workdir_bytes: int = 32 * MiB  # size of the /box tmpfs: total disk the job may use
    max_open_files: int = 256
    # The whole job (all its processes, shared memory, memfds, tmpfs files), where a cgroup per job exists.
    job_memory_bytes: int = 512 * MiB
    job_cpus: float = 1.0  # CPU bandwidth of the whole job

    def bounds(self) -> JobBounds:
        return JobBounds(memory_bytes=self.job_memory_bytes, max_processes=self.max_processes, cpus=self.job_cpus)

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed process did.

    `exit_code` is None when we killed it (wall timeout or output cap). A job killed by a signal inside
    the sandbox reports 128+signal, like a shell, and `signal` names that signal.
    """

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_truncated: bool
    elapsed_ms: float
    memory_limit_hit: bool = False  # the kernel killed a process of the job for the job's memory bound

    @property
    def hit_cpu_limit(self) -> bool:
        """RLIMIT_CPU sends SIGXCPU at the soft limit and SIGKILL at the hard one."""
        return self.signal in (signal.SIGXCPU, signal.SIGKILL)


# -- locating the tools --------------------------------------------------------------------------------


def _find_system_tool(name: str) -> str | None:
    """A tool that must live under /usr (or /bin): only those are visible inside the sandbox too."""
    path = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    return os.path.realpath(path) if path else None


def find_bwrap() -> str:
    path = _find_system_tool("bwrap")
    if path is None:
        raise SandboxError("bubblewrap is not installed: no `bwrap` on /usr/bin (apt-get install bubblewrap)")
    return path


def _rlimits_script(limits: Limits) -> str:
    """The init's first line: dash's `ulimit` sets the job's rlimits on the init itself, so they bind it and
    every process of the job. Units are dash's (KiB; 512-byte blocks for file size), rounded down."""
    cpu = limits.cpu_time_s
    settings = [
        f"-t {cpu + 1}",  # hard: SIGKILL one second after the soft limit's SIGXCPU
        f"-S -t {cpu}",
        f"-d {limits.memory_bytes // KiB}",
        f"-p {limits.max_processes}",
        f"-f {limits.max_file_bytes // 512}",
        f"-n {limits.max_open_files}",
        "-c 0",
        "-l 0",
    ]
    # Without every limit in force nothing runs: exit 123 is a set-up failure (_LAUNCH_FAILURES).
    return " && ".join(f"ulimit {setting}" for setting in settings) + " || exit 123"


def _system_mounts() -> list[str]:
    """Read-only /usr plus the top-level links into it, and the /etc allowlist (when present)."""
    argv = ["--ro-bind", "/usr", "/usr"]
    for path in _SYSTEM_LINKS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in _ETC_ALLOWLIST:
        argv += ["--ro-bind-try", path, path]
    return argv


def _bwrap_argv(
    bwrap: str,
    *,
    status_fd: int,
    init_fd: int,
    file_fds: Mapping[str, int],
    tools: Mapping[str, str],
    env: Mapping[str, str],
    limits: Limits,
    mount_proc: bool = True,
    seccomp_fd: int | None = None,
) -> list[str]:
    """The bwrap options; mounts are applied in order, so the final `--remount-ro /` freezes the root."""
    argv = [
        bwrap,
        "--unshare-all",  # user, pid, net, ipc, uts, cgroup
        "--unshare-user",  # explicitly: required for --uid/--gid and --disable-userns
        # No nested user namespaces: less kernel attack surface. bwrap enforces it by writing
        # /proc/sys/user/max_user_namespaces in the job's /proc; without a /proc of its own (in a container)
        # that is the runtime's read-only /proc/sys, so there it cannot.
        *(["--disable-userns"] if mount_proc else []),
        # ... and a seccomp filter refuses it everywhere (see seccomp.py).
        *(["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else []),
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--hostname",
        "genesis",
        "--die-with-parent",
        "--as-pid-1",  # the init is pid 1, see _init_script
        "--new-session",  # no controlling terminal: blocks TIOCSTI injection into the host's tty
        "--json-status-fd",
        str(status_fd),
        *_system_mounts(),
        *(["--proc", "/proc"] if mount_proc else []),
        "--dev",
        "/dev",
        "--size",
        str(_DEV_SHM_BYTES),
        "--tmpfs",
        "/dev/shm",
        "--remount-ro",
        "/dev",  # /dev/null etc. stay writable (device nodes), but no files can be created there
        "--size",
        str(limits.workdir_bytes),
        "--perms",
        "0700",
        "--tmpfs",
        WORKDIR,
        "--symlink",
        WORKDIR,
        "/tmp",
    ]
    for name, fd in file_fds.items():
        argv += ["--file", str(fd), f"{WORKDIR}/{name}"]
    argv += ["--perms", "0111", "--file", str(init_fd), INIT_PATH]  # execute-only: see the module docstring
    for name, host_path in tools.items():
        argv += ["--ro-bind", host_path, f"{TOOLS_DIR}/{name}"]
    argv += ["--remount-ro", "/", "--chdir", WORKDIR, "--clearenv"]
    base_env = {"PATH": SANDBOX_PATH, "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8"}
    for key, value in {**base_env, **env}.items():
        argv += ["--setenv", key, value]
    return argv


# -- running -------------------------------------------------------------------------------------------


def _memfd_with(name: str, content: bytes) -> int:
    """An anonymous in-memory file holding `content`, positioned at 0 for bwrap's `--file` to copy."""
    fd = os.memfd_create(name)
    view = memoryview(content)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _drop_to_nobody() -> list[str]:
    """setpriv to nobody when we are root, so RLIMIT_NPROC applies (see module docstring)."""
    if os.geteuid() != 0:
        return []
    setpriv = _find_system_tool("setpriv")
    if setpriv is None:
        raise SandboxError("util-linux `setpriv` not found on /usr/bin (apt-get install util-linux)")
    return [setpriv, f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups", "--"]


@functools.cache
def _init_binary() -> bytes:
    """The sandbox's init: the system's dash, whose contents are copied into each sandbox."""
    path = _find_system_tool("dash") or _find_system_tool("sh")
    if path is None:
        raise SandboxError("no /bin/sh (dash) to run as the sandbox's init")
    with open(path, "rb") as handle:
        return handle.read()


def _decode_exit(returncode: int) -> tuple[int, int | None]:
    """The job's exit code as the init shell reports it: 128+N when it died of signal N."""
    if returncode > 128 and returncode - 128 in signal.valid_signals():
        return returncode, returncode - 128
    return returncode, None


_SECCOMP_FILTER = seccomp.job_filter()
PROC_ENV = "GENESIS_SANDBOX_PROC"  # auto (default) | on | off
_proc_refused = False  # set once a container runtime refused bwrap a fresh /proc (see run_sandboxed)


class _JobCgroupTree:
    """This process's job cgroups and their watchdog, set up on first use; or why there are none."""

    def __init__(self) -> None:
        self.tree: JobCgroups | None = None
        self.unavailable: str | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        try:
            self.tree = JobCgroups.detect()
        except (CgroupUnavailable, OSError) as error:
            self.unavailable = str(error)
            log.warning("no cgroup per job: %s; jobs are bounded per process and by oom_score_adj", error)
            return
        # Its stdin is a pipe only we write to: at our exit, whatever the cause, it reads EOF and
        # kills what is left in the job cgroups (watchdog.py).
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "singularity_stack.genesis.watchdog", *map(str, self.tree.bases)],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def describe(self) -> str:
        """Which bound on a whole job is in force here, in words for /readyz and the logs."""
        if self.tree is not None:
            return self.tree.description
        return (
            f"no cgroup per job ({self.unavailable}): memory is bounded per process (rlimits) and by the "
            "host's or the Pod's limit, with jobs first in line for the OOM killer (oom_score_adj 1000)"
        )


_job_cgroup_tree: _JobCgroupTree | None = None


def job_cgroup_tree() -> _JobCgroupTree:
    global _job_cgroup_tree
    if _job_cgroup_tree is None:
        _job_cgroup_tree = _JobCgroupTree()
    return _job_cgroup_tree


def job_bounds_in_force() -> str:
    return job_cgroup_tree().describe()


def _mount_proc() -> bool:
    mode = os.environ.get(PROC_ENV, "auto")
    return mode == "on" or (mode == "auto" and not _proc_refused)


@dataclass(frozen=True)
class Phase:
    """One program of a job (syntax check, lint, run), run in the job's sandbox after the ones before it.

    `env` is added to the sandbox's base environment for this program alone; `address_space_bytes` adds an
    RLIMIT_AS for it (not every runtime tolerates one, see languages.py).
    """

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    address_space_bytes: int | None = None


def _phase_command(phase: Phase) -> str:
    """One phase as a line of the init's script: a child of the init, under its own limit and environment."""
    steps = []
    if phase.address_space_bytes is not None:
        steps.append(f"ulimit -v {phase.address_space_bytes // KiB}")  # dash: KiB, soft and hard
    for key, value in phase.env.items():
        if not key.replace("_", "a").isalnum():
            raise ValueError(f"not an environment variable name: {key!r}")
        steps.append(f"export {key}={shlex.quote(value)}")
    steps.append("exec " + " ".join(map(shlex.quote, phase.argv)))
    # In the background and waited for, as a shell's pid 1 must: `wait` returns the status, 128+N for signal N.
    return "(" + " && ".join(steps) + ") </dev/null & wait $!"


def _init_script(phases: Sequence[Phase], nonce: str, limits: Limits) -> str:
    """The init's script: the rlimits, then each phase in turn; after each but the last a marker on stdout
    (with the status) and on stderr (phase_output.py), then it waits for the host's "go" (end-of-file: stop)."""
    lines = [_rlimits_script(limits)]
    for index, phase in enumerate(phases):
        if index:
            lines.append('read go && [ "$go" = go ] || exit 0')
        lines.append(_phase_command(phase))
        if index < len(phases) - 1:
            lines.append(f"printf '\\n%s %s\\n' {nonce} $?; printf '\\n%s\\n' {nonce} >&2")
    return "\n".join(lines) + "\n"


class JobSandbox:
    """One sandbox for all of a job's phases, each reported as a SandboxResult of its own.

        async with JobSandbox(phases, files=..., limits=...) as box:
            checked = await box.run_next()  # phase 0; leaving the block early runs none of the rest

    The limits hold per phase as they would for a sandbox of its own: the wall time restarts with each
    phase, rlimits bind every process, and a phase that hits one ends the sandbox. The cgroup bounds the
    job as a whole. Phase 0's result includes setting the sandbox up, the last one's tearing it down.

    bwrap writes `{"child-pid": P, ...}` to its `--json-status-fd` memfd once the namespaces exist (P = the
    sandbox's pid 1, as the host sees it) and `{"exit-code": N}` when that process exited. Killing P, not
    bwrap, tears the sandbox down while bwrap is alive to reap it, so no zombie is left for the host's init.
    """

    def __init__(
        self,
        phases: Sequence[Phase],
        *,
        files: Mapping[str, bytes],
        limits: Limits,
        tools: Mapping[str, str] | None = None,
    ) -> None:
        if not phases:
            raise ValueError("a sandbox runs at least one phase")
        self.phases = list(phases)
        self.files = files
        self.limits = limits
        self.tools = tools or {}
        self._next = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._cgroup: JobCgroup | None = None
        self._fds: list[int] = []
        self._status_fd = -1
        self._drains: list[asyncio.Task[None]] = []
        self._out: PhasedStream | None = None
        self._err: PhasedStream | None = None
        self._killed = False
        self._finished = False
        self._oom_kills_at_end = 0

    @property
    def done(self) -> int:
        """How many phases have run (or are running)."""
        return self._next

    async def __aenter__(self) -> JobSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End the sandbox (whatever phases are left do not run) and remove its cgroup."""
        if self._proc is not None:
            self.kill()
            await self._finish()
            self._close_fds()

    async def run_next(self) -> SandboxResult:
        """Run the next phase and report it. Raises SandboxError when bwrap could not build the sandbox."""
        global _proc_refused
        index = self._next
        if index >= len(self.phases):
            raise RuntimeError("every phase of this sandbox has run")
        self._next += 1
        if index > 0:
            return await self._phase(index, time.perf_counter())
        mount_proc = _mount_proc()
        try:
            return await self._first(mount_proc)
        except SandboxError as error:
            if not mount_proc or os.environ.get(PROC_ENV, "auto") != "auto" or "mount proc" not in str(error):
                raise
            log.warning("bwrap may not mount /proc here (%s); running jobs without /proc", error)
            _proc_refused = True
            return await self._first(False)

    async def _first(self, mount_proc: bool) -> SandboxResult:
        started = time.perf_counter()
        self._proc, self._finished, self._killed = None, False, False
        await self._start(mount_proc)
        return await self._phase(0, started)

    async def _start(self, mount_proc: bool) -> None:
        bwrap, drop = find_bwrap(), _drop_to_nobody()
        tree = job_cgroup_tree().tree
        try:
            self._cgroup = tree.create(self.limits.bounds()) if tree is not None else None
        except OSError as error:
            raise SandboxError(f"could not create the job's cgroup: {error}") from None
        try:
            self._status_fd = self._fd(os.memfd_create("bwrap-status"))
            seccomp_fd = self._fd(_memfd_with("seccomp", _SECCOMP_FILTER)) if _SECCOMP_FILTER is not None else None
            file_fds = {name: self._fd(_memfd_with(name, content)) for name, content in self.files.items()}
            sandbox = _bwrap_argv(
                bwrap,
                status_fd=self._status_fd,
                init_fd=self._fd(_memfd_with("init", _init_binary())),
                file_fds=file_fds,
                tools=self.tools,
                env={},
                limits=self.limits,
                mount_proc=mount_proc,
                seccomp_fd=seccomp_fd,
            )
            nonce = secrets.token_hex(16)
            # The init sets the rlimits on itself before anything else, so the sandbox's pid 1 runs under them too.
            init = [INIT_PATH, "-c", _init_script(self.phases, nonce, self.limits), "genesis-init"]
            launch = [*_LAUNCHER, *(self._cgroup.procs_files if self._cgroup else []), "--", *drop]
            command = [*launch, *sandbox, "--", *init]
            starting = asyncio.ensure_future(
                asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.PIPE,  # the init reads "go" before each phase after the first
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=_BWRAP_ENV,
                    pass_fds=self._fds,
                    start_new_session=True,  # its own process group, for the last-resort killpg in _finish
                )
            )
            try:
                self._proc = await asyncio.shield(starting)
            except asyncio.CancelledError:
                # Cancelled while asyncio still connects the pipes: the sandbox may run already. asyncio would
                # kill bwrap itself, leaving the sandbox's init a zombie for the host's init; end it as any job.
                self._proc = await starting
                self._watch_output(nonce)
                await self.close()
                raise
            self._watch_output(nonce)
        except BaseException:
            if self._proc is None:
                self._release()  # never started: nothing else will
                self._close_fds()
            raise

    def _fd(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _watch_output(self, nonce: str) -> None:
        assert self._proc is not None and self._proc.stdout is not None and self._proc.stderr is not None
        cap, count = self.limits.max_output_bytes, len(self.phases)
        self._out = PhasedStream(count, cap, nonce.encode(), True, self.kill)
        self._err = PhasedStream(count, cap, nonce.encode(), False, self.kill)
        self._drains = [
            asyncio.ensure_future(self._out.drain(self._proc.stdout)),
            asyncio.ensure_future(self._err.drain(self._proc.stderr)),
        ]

    async def _phase(self, index: int, started: float) -> SandboxResult:
        try:
            return await self._await_phase(index, started)
        finally:
            if self._finished:
                self._close_fds()  # bwrap's status is read for the last time above

    async def _await_phase(self, index: int, started: float) -> SandboxResult:
        proc, out, err = self._proc, self._out, self._err
        assert proc is not None and out is not None and err is not None
        oom_before = self._oom_kills()
        if index > 0 and proc.stdin is not None:
            with contextlib.suppress(ConnectionError):  # the init is gone: the phase ends at end-of-file
                proc.stdin.write(b"go\n")
                await proc.stdin.drain()
        ended = [out.ended[index], err.ended[index]]
        _, pending = await asyncio.wait(ended, timeout=self.limits.wall_time_s)
        timed_out = bool(pending)
        by_marker = not timed_out and all(future.result() is not None for future in ended)
        if not by_marker:
            if timed_out:
                self.kill()
            await self._finish()  # the sandbox is over: its last phase ended, a limit ended it, or it failed
        elapsed_ms = (time.perf_counter() - started) * 1000
        oom_after = self._oom_kills_at_end if self._finished else self._oom_kills()
        exit_code: int | None
        if by_marker:
            exit_code, died_of = _decode_exit(out.ended[index].result() or 0)
        else:
            # bwrap killed by a signal we did not send is the job's doing (the OOM killer picked it in the job's
            # cgroup), never a setup failure: whatever the job printed must not pass for bwrap's own words.
            monitor_killed = not self._killed and proc.returncode is not None and proc.returncode < 0
            if not self._killed and not monitor_killed and not self._finished_setup():
                detail = _LAUNCH_FAILURES.get(proc.returncode or 0, "")
                detail = f"{detail}: " if detail else ""
                detail += bytes(err.captures[index].data).decode("utf-8", "replace").strip()
                raise SandboxError(f"bwrap could not set up the sandbox (exit {proc.returncode}): {detail}")
            if self._killed or monitor_killed:
                exit_code, died_of = None, (-(proc.returncode or 0) if monitor_killed else None)
            else:
                exit_code, died_of = _decode_exit(proc.returncode or 0)
        stdout, stderr = out.captures[index], err.captures[index]
        return SandboxResult(
            exit_code=exit_code,
            signal=died_of,
            stdout=bytes(stdout.data),
            stderr=bytes(stderr.data),
            timed_out=timed_out,
            output_truncated=stdout.truncated or stderr.truncated,
            elapsed_ms=elapsed_ms,
            memory_limit_hit=oom_after > oom_before,
        )

    def _status(self, key: str) -> int | None:
        raw = os.pread(self._status_fd, 64 * KiB, 0).decode("utf-8", "replace")
        for line in raw.splitlines():
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                value = json.loads(line).get(key)
                if isinstance(value, int):
                    return value
        return None

    def _finished_setup(self) -> bool:
        return self._status("exit-code") is not None

    def _oom_kills(self) -> int:
        return self._cgroup.oom_kills() if self._cgroup is not None else 0

    def kill(self) -> None:
        """SIGKILL the sandbox's pid 1: the kernel then kills everything in its pid namespace."""
        if self._proc is None or self._proc.returncode is not None or self._finished:
            return
        self._killed = True
        init_pid = self._status("child-pid")
        target, send = (init_pid, os.kill) if init_pid else (self._proc.pid, os.killpg)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(target, signal.SIGKILL)

    async def _finish(self) -> None:
        """Wait for bwrap and read both pipes to EOF, then remove the job's cgroup with whatever is left in it.

        Bounded: the job is dead or killed by now, so only what is already buffered is left. If bwrap
        itself does not go, its whole process group is killed; --die-with-parent then ends the sandbox.
        """
        if self._finished or self._proc is None:
            return
        proc = self._proc
        if proc.stdin is not None:
            proc.stdin.close()  # an init waiting for "go" stops
        try:
            for last_resort in (False, True):
                if last_resort:
                    log.error("bwrap %d outlived its sandbox by %.0f s; killing it", proc.pid, _REAP_GRACE_S)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                try:
                    async with asyncio.timeout(_REAP_GRACE_S):
                        await asyncio.gather(*(asyncio.shield(d) for d in self._drains), proc.wait())
                    return
                except TimeoutError:
                    continue
        finally:
            self._finished = True
            if self._cgroup is not None:
                self._oom_kills_at_end = self._cgroup.oom_kills()
            await asyncio.shield(asyncio.to_thread(self._release))

    def _release(self) -> None:
        """Whatever is left in the job's cgroup goes with it; this does not rely on the job at all."""
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


async def run_sandboxed(
    argv: Sequence[str],
    *,
    files: Mapping[str, bytes],
    limits: Limits,
    env: Mapping[str, str] | None = None,
    tools: Mapping[str, str] | None = None,
    address_space_bytes: int | None = None,
) -> SandboxResult:
    """Run `argv` in a fresh sandbox with `files` (name -> content) in its working directory /box.

    `tools` maps a name to a host executable that is bind-mounted read-only at /opt/genesis/bin/<name>.
    A job gets its own /proc. Inside a default container (Kubernetes masks /proc) bwrap may not mount one:
    then, unless GENESIS_SANDBOX_PROC=on, jobs run with no /proc at all from then on (every language here
    runs without it, and a job sees even less of the host).
    Raises SandboxError when bwrap could not build the sandbox; anything the job does is in the result.
    """
    phase = Phase("run", argv, env or {}, address_space_bytes)
    async with JobSandbox([phase], files=files, limits=limits, tools=tools) as box:
        return await box.run_next()


async def probe_sandbox() -> str | None:
    """None when a trivial job runs sandboxed here; otherwise why not (for health checks and test skips)."""
    try:
        result = await run_sandboxed(["true"], files={}, limits=Limits(wall_time_s=10))
    except SandboxError as exc:
        return str(exc)
    if result.exit_code != 0:
        return f"`true` failed inside the sandbox: exit {result.exit_code}, {result.stderr!r}"
    return None

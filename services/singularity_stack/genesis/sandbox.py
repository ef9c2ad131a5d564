"""Run one untrusted process in isolation: bubblewrap namespaces, a cgroup per job, rlimits, a seccomp
filter; output capped as it streams.

Isolation (bubblewrap, `bwrap`):
- new user, pid, net, ipc, uts and cgroup namespaces; no network: only the sandbox's own loopback;
- a fresh root holding only a read-only /usr (plus the /bin, /lib… links), a few harmless /etc files,
  a new /proc and a minimal /dev. Nothing of /etc/shadow, /root, /work or the host's /tmp is mounted;
- the only writable place is /box, a size-capped tmpfs that is the job's own temporary directory
  (/tmp links to it); the source file is copied in from a memfd, so no host file is ever shared;
- an empty environment except PATH/HOME/LANG/TMPDIR and what the language needs;
- a seccomp filter (seccomp.py) on every process of the sandbox: no ptrace, no process_vm_*, no new
  user namespaces, no memfds (unless the runtime needs them), no bpf, io_uring, keyring, mounts…

The sandbox's pid 1 is a tiny init (`dash`) that runs the job as its child and exits with its status;
when it dies the kernel kills every process in the pid namespace. A job must not be able to take it
over (attach to it, write its memory, clear its parent-death signal), so it is copied into the
sandbox execute-only: the kernel marks a process exec'ed from a file it may not read non-dumpable, and
nobody without CAP_SYS_PTRACE may then ptrace it or open its /proc/1/mem. It runs under the job's
rlimits too: nothing in the sandbox runs outside the limits.

Limits, for the job as a whole: a cgroup per job (cgroups.py) bounds memory (every page: heaps,
shared memory, memfds, tmpfs contents, socket buffers), tasks and CPU bandwidth, where the host has a
writable cgroup tree. Per process, everywhere: CPU time, data size, processes, file size and open
files are rlimits set by util-linux `prlimit`. Every process of the sandbox starts with
oom_score_adj 1000, so if memory runs out the kernel kills a job before anything else (that is the
memory bound where no cgroup is available: the host's or the Pod's limit). A job may lower its own
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
namespace unprivileged. Since Linux 5.14 the process count lives in per-user-namespace ucounts,
so concurrent jobs sharing that uid each get their own `max_processes` budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from . import seccomp
from .cgroups import CgroupUnavailable, JobBounds, JobCgroup, JobCgroups

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
# The sandbox's pid 1 (bwrap --as-pid-1 execs it): runs the job as its child and exits with the job's
# status (128+N for signal N). Being init, it also reaps the job's orphans. bwrap's own init would
# do that too, but bwrap exits without waiting for it, leaving a zombie for the host's init.
_INIT = (INIT_PATH, "-c", '"$@" & wait $!', "sh")
# Runs as Genesis, before bwrap: marks everything that follows first in line for the OOM killer, moves
# itself into the job's cgroups (each file named before
# "--"), then execs the rest. Nothing of the job exists yet, so nothing can start outside the cgroup.
_LAUNCHER = (
    "/bin/sh",
    "-c",
    "echo 1000 > /proc/self/oom_score_adj || exit 120\n"
    'while [ "$1" != -- ]; do echo 0 > "$1" || exit 121; shift; done\n'
    'shift\nexec "$@"',
    "genesis-launch",
)
_LAUNCH_FAILURES = {120: "could not set the job's oom_score_adj", 121: "could not move the job into its cgroup"}

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


@dataclass
class _Capture:
    """One output stream, read incrementally and never kept beyond `cap` bytes."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    async def drain(self, stream: asyncio.StreamReader, on_overflow: Callable[[], None]) -> None:
        """Read until EOF, keeping at most `cap` bytes; passing the cap kills the job.

        Past the cap the rest is read and dropped until EOF, which comes as soon as the kill lands:
        asyncio only reports the exit once every pipe is closed, so a pipe left unread would stall us.
        """
        while chunk := await stream.read(_READ_CHUNK):
            if self.truncated:
                continue
            room = self.cap - len(self.data)
            if len(chunk) > room:
                self.data += chunk[:room]
                self.truncated = True
                on_overflow()
            else:
                self.data += chunk


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


def find_prlimit() -> str:
    path = _find_system_tool("prlimit")
    if path is None:
        raise SandboxError("util-linux `prlimit` not found on /usr/bin (apt-get install util-linux)")
    return path


# -- building the command line -------------------------------------------------------------------------


def _rlimit_argv(prlimit: str, limits: Limits, address_space_bytes: int | None) -> list[str]:
    """`prlimit` options, run inside the sandbox so they bind only the job (soft:hard)."""
    cpu = limits.cpu_time_s
    argv = [
        prlimit,
        f"--cpu={cpu}:{cpu + 1}",  # SIGXCPU at the soft limit, SIGKILL one second later
        f"--data={limits.memory_bytes}:{limits.memory_bytes}",
        f"--nproc={limits.max_processes}:{limits.max_processes}",
        f"--fsize={limits.max_file_bytes}:{limits.max_file_bytes}",
        f"--nofile={limits.max_open_files}:{limits.max_open_files}",
        "--core=0:0",
        "--memlock=0:0",
    ]
    if address_space_bytes is not None:
        argv.append(f"--as={address_space_bytes}:{address_space_bytes}")
    return [*argv, "--"]


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
        "--as-pid-1",  # _INIT is pid 1, see there
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


class _Bwrap:
    """One running bwrap and its `--json-status-fd` memfd, which says what bwrap did.

    bwrap writes `{"child-pid": P, ...}` once the namespaces exist (P = the sandbox's pid 1, as the
    host sees it) and `{"exit-code": N}` when that process exited. Killing P, not bwrap, tears the
    sandbox down while bwrap is alive to reap it, so no zombie is left for the host's init to collect.
    """

    def __init__(self, proc: asyncio.subprocess.Process, status_fd: int, cgroup: JobCgroup | None) -> None:
        self.proc = proc
        self.status_fd = status_fd
        self.cgroup = cgroup
        self.killed = False
        self.memory_limit_hit = False

    def _status(self, key: str) -> int | None:
        raw = os.pread(self.status_fd, 64 * KiB, 0).decode("utf-8", "replace")
        for line in raw.splitlines():
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                value = json.loads(line).get(key)
                if isinstance(value, int):
                    return value
        return None

    def finished_setup(self) -> bool:
        return self._status("exit-code") is not None

    def kill(self) -> None:
        """SIGKILL the sandbox's pid 1: the kernel then kills everything in its pid namespace."""
        if self.proc.returncode is not None:
            return
        self.killed = True
        init_pid = self._status("child-pid")
        target, send = (init_pid, os.kill) if init_pid else (self.proc.pid, os.killpg)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            send(target, signal.SIGKILL)

    async def reap(self) -> None:
        """Wait for bwrap and read both pipes to EOF (discarding), so asyncio can close its transports.

        Bounded: the job is dead or killed by now, so only what is already buffered is left. If bwrap
        itself does not go, its whole process group is killed; --die-with-parent then ends the sandbox.
        """
        streams = [s for s in (self.proc.stdout, self.proc.stderr) if s is not None]

        async def discard(stream: asyncio.StreamReader) -> None:
            while await stream.read(_READ_CHUNK):
                pass

        try:
            for last_resort in (False, True):
                if last_resort:
                    log.error("bwrap %d outlived its sandbox by %.0f s; killing it", self.proc.pid, _REAP_GRACE_S)
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                try:
                    async with asyncio.timeout(_REAP_GRACE_S):
                        await asyncio.gather(*(discard(s) for s in streams), self.proc.wait())
                    return
                except TimeoutError:
                    continue
        finally:
            if self.cgroup is not None:
                self.memory_limit_hit = self.cgroup.oom_kills() > 0
                # Whatever is left in the job's cgroup goes with it; this does not rely on the job at all.
                await asyncio.shield(asyncio.to_thread(self.cgroup.remove))

    async def supervise(self, limits: Limits) -> tuple[_Capture, _Capture, bool]:
        """Stream both outputs under their caps and the wall-time limit; returns (stdout, stderr, timed_out)."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out, err = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes)
        timed_out = False
        try:
            async with asyncio.timeout(limits.wall_time_s):
                await asyncio.gather(out.drain(self.proc.stdout, self.kill), err.drain(self.proc.stderr, self.kill))
                await self.proc.wait()
        except TimeoutError:
            timed_out = True
        finally:
            # Also on cancellation (service shutdown): never leave a job running behind us.
            self.kill()
            await self.reap()
        return out, err, timed_out


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

    A job gets its own /proc. Inside a default container (Kubernetes masks /proc) bwrap may not mount one:
    then, unless GENESIS_SANDBOX_PROC=on, jobs run with no /proc at all from then on (every language here
    runs without it, and a job sees even less of the host).
    """
    global _proc_refused
    mount_proc = _mount_proc()
    try:
        return await _run_once(argv, files, limits, env, tools, address_space_bytes, mount_proc)
    except SandboxError as error:
        if not mount_proc or os.environ.get(PROC_ENV, "auto") != "auto" or "mount proc" not in str(error):
            raise
        log.warning("bwrap may not mount /proc here (%s); running jobs without /proc", error)
        _proc_refused = True
        return await _run_once(argv, files, limits, env, tools, address_space_bytes, False)


async def _run_once(
    argv: Sequence[str],
    files: Mapping[str, bytes],
    limits: Limits,
    env: Mapping[str, str] | None,
    tools: Mapping[str, str] | None,
    address_space_bytes: int | None,
    mount_proc: bool,
) -> SandboxResult:
    """Run `argv` in a fresh sandbox with `files` (name -> content) in its working directory /box.

    `tools` maps a name to a host executable that is bind-mounted read-only at /opt/genesis/bin/<name>.
    `address_space_bytes` adds an RLIMIT_AS (not every runtime tolerates one, see languages.py).
    Raises SandboxError when bwrap could not build the sandbox; anything the job does is in the result.
    """
    bwrap, prlimit, drop = find_bwrap(), find_prlimit(), _drop_to_nobody()
    tree = job_cgroup_tree().tree
    try:
        cgroup = tree.create(limits.bounds()) if tree is not None else None
    except OSError as error:
        raise SandboxError(f"could not create the job's cgroup: {error}") from None
    fds: list[int] = []
    job: _Bwrap | None = None
    try:
        status_fd = os.memfd_create("bwrap-status")
        fds.append(status_fd)
        seccomp_fd = None
        if (seccomp_filter := _SECCOMP_FILTER) is not None:
            seccomp_fd = _memfd_with("seccomp", seccomp_filter)
            fds.append(seccomp_fd)
        file_fds: dict[str, int] = {}
        for name, content in files.items():
            file_fds[name] = _memfd_with(name, content)
            fds.append(file_fds[name])
        init_fd = _memfd_with("init", _init_binary())
        fds.append(init_fd)
        sandbox = _bwrap_argv(
            bwrap,
            status_fd=status_fd,
            init_fd=init_fd,
            file_fds=file_fds,
            tools=tools or {},
            env=env or {},
            limits=limits,
            mount_proc=mount_proc,
            seccomp_fd=seccomp_fd,
        )
        launch = [*_LAUNCHER, *(cgroup.procs_files if cgroup else []), "--", *drop]
        # The rlimits come before the init, so the sandbox's pid 1 runs under them as well.
        command = [*launch, *sandbox, "--", *_rlimit_argv(prlimit, limits, address_space_bytes), *_INIT, *argv]
        started = time.perf_counter()
        starting = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=_BWRAP_ENV,
                pass_fds=fds,
                start_new_session=True,  # its own process group, for the last-resort killpg in _Bwrap.reap
            )
        )
        try:
            proc = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # Cancelled while asyncio still connects the pipes: the sandbox may run already. asyncio would kill
            # bwrap itself, leaving the sandbox's init a zombie for the host's init; end it as any job instead.
            job = _Bwrap(await starting, status_fd, cgroup)
            job.kill()
            await job.reap()
            raise
        job = _Bwrap(proc, status_fd, cgroup)
        out, err, timed_out = await job.supervise(limits)
        elapsed_ms = (time.perf_counter() - started) * 1000
        # bwrap killed by a signal we did not send is the job's doing (the OOM killer picked it in the job's
        # cgroup), never a setup failure: whatever the job printed must not pass for bwrap's own words.
        monitor_killed = not job.killed and proc.returncode is not None and proc.returncode < 0
        if not job.killed and not monitor_killed and not job.finished_setup():
            detail = _LAUNCH_FAILURES.get(proc.returncode or 0, "")
            detail = f"{detail}: " if detail else ""
            detail += bytes(err.data).decode("utf-8", "replace").strip()
            raise SandboxError(f"bwrap could not set up the sandbox (exit {proc.returncode}): {detail}")
    finally:
        for fd in fds:
            os.close(fd)
        if job is None and cgroup is not None:
            cgroup.remove()  # never started: nothing else will
    if job.killed or monitor_killed:
        exit_code, died_of = None, (-(proc.returncode or 0) if monitor_killed else None)
    else:
        exit_code, died_of = _decode_exit(proc.returncode or 0)
    return SandboxResult(
        exit_code=exit_code,
        signal=died_of,
        stdout=bytes(out.data),
        stderr=bytes(err.data),
        timed_out=timed_out,
        output_truncated=out.truncated or err.truncated,
        elapsed_ms=elapsed_ms,
        memory_limit_hit=job.memory_limit_hit,
    )


async def probe_sandbox() -> str | None:
    """None when a trivial job runs sandboxed here; otherwise why not (for health checks and test skips)."""
    try:
        result = await run_sandboxed(["true"], files={}, limits=Limits(wall_time_s=10))
    except SandboxError as exc:
        return str(exc)
    if result.exit_code != 0:
        return f"`true` failed inside the sandbox: exit {result.exit_code}, {result.stderr!r}"
    return None

"""Run one untrusted process in isolation: bubblewrap namespaces plus rlimits, output capped as it streams.

Isolation (bubblewrap, `bwrap`):
- new user, pid, net, ipc, uts and cgroup namespaces; no network: only the sandbox's own loopback;
- a fresh root holding only a read-only /usr (plus the /bin, /lib… links), a few harmless /etc files,
  a new /proc and a minimal /dev. Nothing of /etc/shadow, /root, /work or the host's /tmp is mounted;
- the only writable place is /box, a size-capped tmpfs that is the job's own temporary directory
  (/tmp links to it); the source file is copied in from a memfd, so no host file is ever shared;
- an empty environment except PATH/HOME/LANG/TMPDIR and what the language needs;
- a pid namespace whose pid 1 is a tiny `sh` init: when it dies, the kernel kills every process the
  job started; `--die-with-parent` does the same if the service itself dies.

Limits: wall time and the output caps are enforced here, by SIGKILLing the sandbox's pid 1; CPU time,
memory, process count, file size and open files are rlimits set by util-linux `prlimit` *inside* the
sandbox, so they bind the job and not bwrap or its init.

Why the job runs as a real unprivileged uid: RLIMIT_NPROC is never enforced for the host's root user
(kernel/fork.c exempts INIT_USER), and a uid that is only 65534 *inside* a user namespace is still
root outside. So when the service runs as root, bwrap is started as nobody (65534) and creates the
user namespace unprivileged. Since Linux 5.14 the process count lives in per-user-namespace ucounts,
so concurrent jobs sharing that uid each get their own `max_processes` budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import seccomp

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

SANDBOX_UID = 65534  # "nobody": an unprivileged uid, see the module docstring for why it matters
WORKDIR = "/box"  # the job's writable temporary directory inside the sandbox
TOOLS_DIR = "/opt/genesis/bin"  # where host tools (linters) are bind-mounted read-only
SANDBOX_PATH = "/usr/bin:/bin"  # not /usr/local: interpreters are the distribution's

_DEV_SHM_BYTES = 4 * MiB  # POSIX semaphores/shm need a little; tmpfs is RAM not covered by RLIMIT_DATA
_READ_CHUNK = 64 * KiB
_REAP_GRACE_S = 5.0  # after SIGKILL the namespace is torn down by the kernel; this is only a safety net
# The sandbox's pid 1 (bwrap --as-pid-1 execs it): runs the job as its child and exits with the job's
# status (128+N for signal N). Being init, it also reaps the job's orphans. bwrap's own init would
# do that too, but bwrap exits without waiting for it, leaving a zombie for the host's init.
_INIT = ("sh", "-c", '"$@" & wait $!', "sh")

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


def _spawn_identity() -> dict[str, Any]:
    """Drop to nobody when we are root, so RLIMIT_NPROC applies (see module docstring)."""
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


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

    def __init__(self, proc: asyncio.subprocess.Process, status_fd: int) -> None:
        self.proc = proc
        self.status_fd = status_fd
        self.killed = False

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


_SECCOMP_FILTER = seccomp.no_new_user_namespaces()
PROC_ENV = "GENESIS_SANDBOX_PROC"  # auto (default) | on | off
_proc_refused = False  # set once a container runtime refused bwrap a fresh /proc (see run_sandboxed)


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
    bwrap, prlimit = find_bwrap(), find_prlimit()
    fds: list[int] = []
    try:
        status_fd = os.memfd_create("bwrap-status")
        fds.append(status_fd)
        seccomp_fd = None
        if _SECCOMP_FILTER is not None:
            seccomp_fd = _memfd_with("seccomp", _SECCOMP_FILTER)
            fds.append(seccomp_fd)
        file_fds: dict[str, int] = {}
        for name, content in files.items():
            file_fds[name] = _memfd_with(name, content)
            fds.append(file_fds[name])
        sandbox = _bwrap_argv(
            bwrap,
            status_fd=status_fd,
            file_fds=file_fds,
            tools=tools or {},
            env=env or {},
            limits=limits,
            mount_proc=mount_proc,
            seccomp_fd=seccomp_fd,
        )
        command = [*sandbox, "--", *_INIT, *_rlimit_argv(prlimit, limits, address_space_bytes), *argv]
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_BWRAP_ENV,
            pass_fds=fds,
            start_new_session=True,  # its own process group, for the last-resort killpg in _Bwrap.reap
            **_spawn_identity(),
        )
        job = _Bwrap(proc, status_fd)
        out, err, timed_out = await job.supervise(limits)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if not job.killed and not job.finished_setup():
            detail = bytes(err.data).decode("utf-8", "replace").strip()
            raise SandboxError(f"bwrap could not set up the sandbox (exit {proc.returncode}): {detail}")
    finally:
        for fd in fds:
            os.close(fd)
    exit_code, died_of = (None, None) if job.killed else _decode_exit(proc.returncode or 0)
    return SandboxResult(
        exit_code=exit_code,
        signal=died_of,
        stdout=bytes(out.data),
        stderr=bytes(err.data),
        timed_out=timed_out,
        output_truncated=out.truncated or err.truncated,
        elapsed_ms=elapsed_ms,
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

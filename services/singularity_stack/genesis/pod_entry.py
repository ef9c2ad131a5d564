"""The entry point of a job Pod (`sandbox: pod`): runs the job's phases in order and reports each on stdout.

Started by the job Pod's container (pod_sandbox.job_pod_manifest) as its pid 1, with the job's phases in
GENESIS_JOB_SPEC (JSON) and its source in GENESIS_JOB_CODE (base64), both removed from the environment
before anything of the job starts. Every phase runs as a child with an empty environment (plus what its
language needs), stdin /dev/null, /box as its directory and the same per-process rlimits as in the
bubblewrap sandbox; its stdout and stderr are read here, each kept up to the cap (past it the phase is
killed), and its wall time is bounded here. Each phase also runs under the bubblewrap mode's seccomp filter
(seccomp.py: no ptrace, no new namespaces, ...) and one more that refuses IPv4 and IPv6 sockets, so a job
has no network even where the cluster's network plugin does not enforce the job Pods' NetworkPolicy.
After each phase whatever it left running is killed
(`kill(-1)` from a pid namespace's init reaches every other process in it), then one frame is written to
stdout: `\\n<nonce> <json>\\n`. Genesis reads the frames from the Pod's log, in order, and takes the first
one of each phase: a phase's frame is written before the next phase starts, so the job's program (always
the last phase) cannot change what an earlier phase reported.

What a job cannot do to this process: it is the pid namespace's init, so the kernel drops signals from
inside that it does not handle (SIGKILL included), and it makes itself non-dumpable first, so a process of
the same uid can neither ptrace it nor open its /proc/1/fd or /proc/1/environ.

The whole job is bounded by the container's cgroup (the Pod's resources: memory, CPU) and the Pod's
activeDeadlineSeconds; an OOM kill in the cgroup while a phase ran is reported as that phase's.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import json
import os
import platform
import resource
import selectors
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPEC_ENV = "GENESIS_JOB_SPEC"
CODE_ENV = "GENESIS_JOB_CODE"
TOOL_PREFIX = "tool:"  # argv[0] "tool:ruff": the linter of that name, located in this image
_PR_SET_DUMPABLE = 4
_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2
_READ_CHUNK = 64 * 1024
_BASE_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _non_dumpable() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")


def oom_kills() -> int:
    """OOM kills in this container's memory cgroup so far (cgroup v2 memory.events, v1 memory.oom_control)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(path).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


def no_inet_filter(machine: str | None = None) -> bytes | None:
    """A seccomp filter refusing IPv4 and IPv6 sockets (EACCES), stacked on the job filter: a job Pod has no
    network by its NetworkPolicy, and this holds on a cluster whose network plugin does not enforce one."""
    from singularity_stack.genesis import seccomp

    column = {"x86_64": 0, "aarch64": 1}.get(machine or platform.machine())
    if column is None:
        return None
    socket_nr = seccomp.CHECKED_CALLS["socket"][column]
    allow, eacces = 0x7FFF0000, 0x00050000 | errno.EACCES
    code = [
        (0x20, 0, 0, 0),  # load the call's number
        (0x15, 0, 4, socket_nr),  # socket? else allow
        (0x20, 0, 0, 16),  # load its family (args[0], low word)
        (0x15, 1, 0, seccomp.SOCKET_FAMILIES["AF_INET"]),
        (0x15, 0, 1, seccomp.SOCKET_FAMILIES["AF_INET6"]),
        (0x06, 0, 0, eacces),
        (0x06, 0, 0, allow),
    ]
    return b"".join(struct.pack("<HBBI", op, jt, jf, k) for op, jt, jf, k in code)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_filters(filters: list[bytes]) -> None:
    """Each filter on this process (no_new_privs first, as an unprivileged process must)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    for program in filters:
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def job_filters() -> list[bytes]:
    """The bubblewrap mode's job filter (seccomp.py) and no IPv4/IPv6 sockets, where the architecture is known."""
    from singularity_stack.genesis import seccomp

    return [f for f in (seccomp.job_filter(), no_inet_filter()) if f is not None]


def _rlimits(limits: dict[str, Any], address_space: int | None, filters: list[bytes]) -> Callable[[], None]:
    def apply() -> None:
        cpu = limits["cpu_time_s"]
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
        resource.setrlimit(resource.RLIMIT_DATA, (limits["memory_bytes"], limits["memory_bytes"]))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"], limits["max_processes"]))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_bytes"], limits["max_file_bytes"]))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"], limits["max_open_files"]))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        with contextlib.suppress(OSError):  # the job first in line for the OOM killer, before this init
            Path("/proc/self/oom_score_adj").write_text("1000")
        os.setsid()
        _load_filters(filters)  # last: the filters refuse nothing of the above, but bind all the job runs

    return apply


def _locate(argv: list[str]) -> list[str] | str:
    """argv with a `tool:<name>` first word replaced by the linter's path here; or why it cannot run."""
    if not argv or not argv[0].startswith(TOOL_PREFIX):
        return argv
    name = argv[0].removeprefix(TOOL_PREFIX)
    from singularity_stack.genesis.languages import LANGUAGES

    for language in LANGUAGES.values():
        if language.linter is not None and language.linter.tool == name:
            path = language.linter.locate()
            if path is None:
                return f"{name} is not installed in the job image: {language.linter.install_hint}"
            return [path, *argv[1:]]
    return f"no linter called {name}"


def _kill_the_rest(proc: subprocess.Popen[bytes]) -> None:
    """Every process of the job: all of the pid namespace but this init (or the phase's session elsewhere)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpid() == 1:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def run_phase(phase: dict[str, Any], limits: dict[str, Any], workdir: str, filters: list[bytes]) -> dict[str, Any]:
    """One phase, to its frame: exit code (128+N for signal N, None when killed here), output, limits hit."""
    started = time.perf_counter()
    argv = _locate(list(phase["argv"]))
    if isinstance(argv, str):
        return {"name": phase["name"], "problem": argv, "elapsed_ms": 0.0}
    cap = limits["max_output_bytes"]
    env = {**_BASE_ENV, "HOME": workdir, "TMPDIR": workdir, **phase.get("env", {})}
    oom_before = oom_kills()
    proc = subprocess.Popen(
        argv,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_rlimits(limits, phase.get("address_space_bytes"), filters),
        close_fds=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    outputs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    selector = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        selector.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + float(limits["wall_time_s"])
    timed_out = truncated = False

    def read(wait: float) -> bool:
        """Read what is ready within `wait`; False once a cap is passed."""
        for key, _ in selector.select(wait):
            chunk = os.read(key.fd, _READ_CHUNK)
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            kept = outputs[key.fd]
            room = cap - len(kept)
            kept += chunk[: max(room, 0)]
            if len(chunk) > room:
                return False
        return True

    # The phase ends when its program exits (what it left running does not hold it), at its wall time, or
    # when it passes an output cap.
    while proc.poll() is None and selector.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if not read(min(left, 0.05)):
            truncated = True
            break
    while not timed_out and not truncated and proc.poll() is None:  # both pipes closed, still running
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        time.sleep(min(left, 0.01))
    killed = timed_out or truncated
    _kill_the_rest(proc)  # the phase's program if it is still running, and whatever it left behind
    returncode = proc.wait()
    _reap()
    while not truncated and selector.get_map():  # what was written before the end; every writer is gone
        if not read(1.0):
            truncated = True
    selector.close()
    proc.stdout.close()
    proc.stderr.close()
    exit_code, died_of = (None, None) if killed else _decode(returncode)
    return {
        "name": phase["name"],
        "exit_code": exit_code,
        "signal": died_of,
        **_streams(outputs),
        "timed_out": timed_out,
        "output_truncated": truncated,
        "memory_limit_hit": oom_kills() > oom_before,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
    }


def _streams(outputs: dict[int, bytearray]) -> dict[str, str]:
    out, err = list(outputs.values())  # in the order registered: stdout, stderr
    return {"stdout": base64.b64encode(bytes(out)).decode(), "stderr": base64.b64encode(bytes(err)).decode()}


def _decode(returncode: int) -> tuple[int, int | None]:
    """As a shell reports it: 128+N when the program died of signal N."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


def main() -> int:
    # The kernel drops a signal sent to a pid namespace's init from inside only while init has no handler
    # for it: Python's own SIGINT handler would let a job kill this process (KeyboardInterrupt) and lose
    # its result. Default disposition, so the job can neither interrupt nor kill the entry.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _non_dumpable()
    spec = json.loads(os.environ.pop(SPEC_ENV))
    code = base64.b64decode(os.environ.pop(CODE_ENV, ""))
    workdir = spec["workdir"]
    source = Path(workdir) / spec["source_name"]
    source.write_bytes(code)
    source.chmod(0o644)
    nonce = spec["nonce"]
    filters = job_filters()
    for phase in spec["phases"]:
        frame = run_phase(phase, spec["limits"], workdir, filters)
        sys.stdout.write(f"\n{nonce} {json.dumps(frame, separators=(',', ':'))}\n")
        sys.stdout.flush()
        carry_on = phase.get("continue_on", [])
        if "problem" in frame or frame["exit_code"] not in carry_on or frame["memory_limit_hit"]:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

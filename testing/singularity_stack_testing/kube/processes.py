"""Long-running helper processes of a test cluster: one process group, one log file each, waited on together."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

STOP_GRACE = 5.0
LOG_TAIL_LINES = 40
_PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    """A process failed to start or died; the message carries the tail of its log."""


def _die_with_parent() -> None:
    # If the test process is killed outright, take the cluster down with it rather than leave it holding ports
    # and memory. Runs in the child between fork and exec.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ProcessGroup:
    """Named processes sharing the first one's process group, logging to ``<log_dir>/<name>.log``."""

    def __init__(self, log_dir: Path, error: type[Exception] = ProcessError) -> None:
        self.log_dir = log_dir
        self.error = error
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._pgid: int | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.processes

    @property
    def running(self) -> bool:
        return bool(self.processes) and all(proc.poll() is None for proc in self.processes.values())

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        return tail(self.log_path(name), lines)

    def launch(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        # PDEATHSIG fires when the *thread* that forked exits, so only ask for it from the main thread.
        in_main_thread = threading.current_thread() is threading.main_thread()
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_dir,
                env=None if env is None else {**os.environ, **env},
                process_group=self._pgid or 0,
                preexec_fn=_die_with_parent if in_main_thread else None,
            )
        self.processes[name] = proc
        if self._pgid is None:
            self._pgid = proc.pid
        return proc

    def kill(self, name: str) -> None:
        """Stop one process now (SIGKILL) and forget it."""
        proc = self.processes.pop(name, None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def terminate(self, name: str, grace: float = STOP_GRACE) -> None:
        """Stop one process (SIGTERM, SIGKILL after ``grace`` seconds) and forget it."""
        proc = self.processes.pop(name, None)
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the whole group, SIGKILL after ``grace`` seconds (also what a process forked). Idempotent."""
        if self._pgid is not None:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in self.processes.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            self._signal_group(signal.SIGKILL)
            for proc in self.processes.values():
                proc.wait()
        self.processes.clear()
        self._pgid = None

    def memory_rss(self) -> dict[str, int]:
        """Resident memory in bytes of each running process (from /proc)."""
        usage = {}
        for name, proc in self.processes.items():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        usage[name] = int(line.split()[1]) * 1024
        return usage

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        """Poll ``ready`` until it is true; fail early, with its log, when one of the processes exits."""
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise self.error(
                        f"{name} exited with status {proc.returncode} while waiting for {what}; "
                        f"last lines of {self.log_path(name)}:\n{self.log_tail(name)}"
                    )
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {name}:\n{self.log_tail(name)}" for name in self.processes)
                raise self.error(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
            time.sleep(0.1)

    def _signal_group(self, signum: int) -> None:
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, signum)

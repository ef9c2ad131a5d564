"""What keeps `up` in charge of how it ends: output that can never kill it, the stop signals, one `up` per
state directory.

- `SafeOutput`: stdout and stderr whose writes never raise. A closed terminal (EIO), a pipe whose reader
  exited (EPIPE) or a closed descriptor turns the stream into /dev/null, so the shutdown path always runs.
- `Stop`: SIGINT, SIGTERM and SIGHUP set it (the first one decides the exit status); so do the output's
  reader going away and the parent process dying (`check`).
- `StateLock`: an exclusive `flock` on `<state>/up.lock`, which holds the owner's pid. The kernel releases
  it when its owner dies, however it dies, so a stale lock is never in the way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

# How `up` ended, as its exit status (README: "Exit status of up").
EXIT_STOPPED = 0  # Ctrl-C (SIGINT) or SIGTERM: asked to stop, and everything stopped
EXIT_FAILED = 1  # something failed while starting (the message says what); everything started was stopped
EXIT_LOCKED = 3  # another `up` holds the state directory; nothing was touched
EXIT_HANGUP = 128 + signal.SIGHUP  # 129: the terminal closed, or the parent process died
EXIT_OUTPUT_GONE = 128 + signal.SIGPIPE  # 141: stdout or stderr went away (the pipe's reader exited)


class SafeOutput:
    """A text stream whose write and flush never raise; once the stream fails it writes to /dev/null."""

    def __init__(self, stream: TextIO | None) -> None:
        # None: the descriptor was closed when `up` started (Python found no stdout/stderr to open).
        self._stream = stream if stream is not None else open(os.devnull, "w")  # noqa: SIM115
        self.broken = stream is None

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._break()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._break()

    def _break(self) -> None:
        """Point the descriptor at /dev/null, so the interpreter's own final flush cannot fail either."""
        self.broken = True
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()  # what was buffered goes to /dev/null

    def gone(self) -> bool:
        """Whether the reader went away: a pipe with no reader (POLLERR) or a hung-up terminal (POLLHUP)."""
        if self.broken:
            return True
        try:
            poller = select.poll()
            poller.register(self._stream.fileno(), select.POLLOUT)
            events = poller.poll(0)
        except (OSError, ValueError):
            return True
        return any(mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, mask in events)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def protect_output() -> tuple[SafeOutput, SafeOutput]:
    """Replace sys.stdout and sys.stderr (and the logging handlers that hold them) with SafeOutput."""
    import logging
    import sys

    out, err = SafeOutput(sys.stdout), SafeOutput(sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
            handler.setStream(out if handler.stream is sys.stdout else err)
    sys.stdout, sys.stderr = out, err
    return out, err


class Stop:
    """Set by the first stop signal or event; `code` is the exit status that tells how `up` ended."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, outputs: tuple[SafeOutput, ...] = ()) -> None:
        self.event = threading.Event()
        self.code = EXIT_STOPPED
        self.reason = ""
        self._outputs = outputs
        self._parent = os.getppid()
        self._hangups = True

    def install(self) -> None:
        # Under nohup (SIGHUP ignored from the start) `up` outlives its terminal and its shell, as asked.
        self._hangups = signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
        for sig in self.SIGNALS if self._hangups else (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.set(EXIT_HANGUP if signum == signal.SIGHUP else EXIT_STOPPED, name)

    def set(self, code: int, reason: str) -> None:
        if not self.event.is_set():  # the first reason decides the status; later signals change nothing
            self.code, self.reason = code, reason
            self.event.set()

    def check(self) -> bool:
        """Whether to stop: a signal came, the output's reader went away or the parent process died."""
        if not self.event.is_set():
            if any(output.gone() for output in self._outputs):
                self.set(EXIT_OUTPUT_GONE, "stdout or stderr went away")
            elif self._hangups and os.getppid() != self._parent:
                self.set(EXIT_HANGUP, "the parent process died")
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds) or self.check()


class StateLocked(Exception):
    def __init__(self, state: Path, owner: str) -> None:
        super().__init__(f"{state} is in use by another `up` (pid {owner or 'unknown'}); stop it first")


class StateLock:
    """One `up` per state directory: an exclusive flock on `<state>/up.lock`, holding the owner's pid."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.path = state / "up.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StateLocked(self.state, owner) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


class UpError(Exception):
    """`up` cannot go on; the message says why, in one line."""

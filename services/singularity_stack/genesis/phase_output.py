"""One sandbox's stdout and stderr, split into the outputs of the job's phases (syntax check, lint, run).

The phases run one after another in one sandbox and share its two pipes. After each phase but the last,
the sandbox's init writes a marker to both: `\\n<nonce> <exit status>\\n` on stdout, `\\n<nonce>\\n` on
stderr. The phase has exited by then, so everything it wrote is before the marker. The nonce is drawn per
sandbox by Genesis and is not in the source, so what a phase prints (a linter echoing the attacker's code)
cannot pass for a marker; only the last phase runs the job's own program, and no marker follows it.
Each phase's output is kept up to its own cap; passing the cap calls `on_overflow` (the job is killed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

_READ_CHUNK = 64 * 1024
_STATUS_DIGITS = 4  # "255" or "137": the longest status line the init writes after the nonce


@dataclass
class Capture:
    """One phase's output on one stream, never kept beyond `cap` bytes."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def add(self, chunk: bytes) -> bool:
        """Keep what fits; False once the cap is passed (the rest is dropped)."""
        if self.truncated:
            return False
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.data += chunk[:room]
            self.truncated = True
            return False
        self.data += chunk
        return True


class PhasedStream:
    """Reads one pipe to EOF, handing each phase's bytes to that phase's Capture.

    `ended[i]` resolves when phase i's output is complete: with its exit status where the init's marker
    ended it (stdout carries the status; stderr's marker carries none: 0), or None at end-of-file.
    """

    def __init__(self, phases: int, cap: int, nonce: bytes, with_status: bool, on_overflow: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self.captures = [Capture(cap) for _ in range(phases)]
        self.ended: list[asyncio.Future[int | None]] = [loop.create_future() for _ in range(phases)]
        self._marker = b"\n" + nonce + (b" " if with_status else b"\n")
        self._with_status = with_status
        self._on_overflow = on_overflow
        self._phase = 0
        self._pending = b""

    def _emit(self, chunk: bytes) -> None:
        if self._phase < len(self.captures) and chunk and not self.captures[self._phase].add(chunk):
            self._on_overflow()

    def _end_phase(self, status: int | None) -> None:
        if self._phase < len(self.ended):
            self.ended[self._phase].set_result(status)
        self._phase += 1

    def _feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        while self._phase < len(self.captures) - 1:  # the last phase has no marker after it
            at = data.find(self._marker)
            if at < 0:
                break
            end = at + len(self._marker)
            if self._with_status:
                newline = data.find(b"\n", end, end + _STATUS_DIGITS + 1)
                if newline < 0:
                    if len(data) - end <= _STATUS_DIGITS:
                        break  # the status line is still on its way
                    self._emit(data[:end])  # not the init's: a status is a few digits
                    data = data[end:]
                    continue
                status = int(data[end:newline]) if data[end:newline].isdigit() else None
                if status is None:
                    self._emit(data[:end])
                    data = data[end:]
                    continue
                end = newline + 1
            else:
                status = 0
            self._emit(data[:at])
            self._end_phase(status)
            data = data[end:]
        keep = len(self._marker) + _STATUS_DIGITS if self._phase < len(self.captures) - 1 else 0
        cut = max(0, len(data) - keep)
        self._emit(data[:cut])
        self._pending = data[cut:]

    async def drain(self, stream: asyncio.StreamReader) -> None:
        """Read until EOF; past a cap the rest is read and dropped (asyncio reports the exit only at EOF)."""
        try:
            while chunk := await stream.read(_READ_CHUNK):
                self._feed(chunk)
            self._emit(self._pending)
            self._pending = b""
        finally:
            while self._phase < len(self.ended):
                self._end_phase(None)

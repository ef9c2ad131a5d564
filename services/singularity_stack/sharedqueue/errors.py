"""What a handler, or the queue's infrastructure, can say about a message besides "done".

A handler raises `Permanent` when a message can never succeed (dead-letter it now, with the reason)
and `RetryAfter` when it knows when to try again; any other exception is retried with the
consumer's back-off and dead-lettered once its attempts run out. `Unavailable` is the one signal
of infrastructure trouble (a database went away): never the message's fault, so it is never
counted against it.
"""

from __future__ import annotations


class Permanent(Exception):
    """This message can never succeed: dead-letter it now, with `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryAfter(Exception):
    """Try this message again in `seconds` (still bounded by the consumer's attempts)."""

    def __init__(self, seconds: float, reason: str = "") -> None:
        if seconds < 0:
            raise ValueError(f"RetryAfter needs a delay of 0 s or more, got {seconds}")
        super().__init__(reason or f"retry in {seconds:g} s")
        self.seconds = seconds
        self.reason = reason


class Unavailable(Exception):
    """A database the queue needs (the shared queue, or the consumer's own) cannot be reached now."""

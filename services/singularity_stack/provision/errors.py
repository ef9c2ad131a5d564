"""What provisioning raises when it cannot go on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg


class ProvisionError(RuntimeError):
    """Provisioning cannot go on; the message says what to do."""


class PgmqUpgradeRequired(ProvisionError):
    """The installed pgmq is older than the packaged one and cannot be upgraded automatically."""

    def __init__(self, reason: str, command: str) -> None:
        super().__init__(f"{reason}; to upgrade: {command}")
        self.reason = reason
        self.command = command


@contextmanager
def failing(what: str) -> Iterator[None]:
    """A database error becomes a ProvisionError saying what failed; one about reaching the server (or its
    resources: too many clients, a lock timeout) stays a psycopg.OperationalError, which callers retry later."""
    try:
        yield
    except psycopg.OperationalError:
        raise
    except psycopg.Error as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProvisionError(f"{what} failed: {detail}") from error

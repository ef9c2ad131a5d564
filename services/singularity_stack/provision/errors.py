"""What provisioning raises when it cannot go on."""

from __future__ import annotations


class ProvisionError(RuntimeError):
    """Provisioning cannot go on; the message says what to do."""


class PgmqUpgradeRequired(ProvisionError):
    """The installed pgmq is older than the packaged one and cannot be upgraded automatically."""

    def __init__(self, reason: str, command: str) -> None:
        super().__init__(f"{reason}; to upgrade: {command}")
        self.reason = reason
        self.command = command

"""Connecting to nats-server as a service's own user, with its own inbox prefix (nats_permissions.py)."""

from __future__ import annotations

import logging
from typing import Any

import nats
from nats.aio.client import Client

from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)


async def _log_error(error: Exception) -> None:
    # Permission violations and lost connections: the client reconnects by itself; say so in the log.
    log.warning("NATS: %s", error)


async def connect(url: str, layout: StackLayout, logical: str, password: str, **options: Any) -> Client:
    """A connection that reconnects forever (a nats-server restart is ridden out, as PostgreSQL's is)."""
    settings: dict[str, Any] = {
        "user": subjects.user(layout, logical),
        "password": password,
        "inbox_prefix": subjects.inbox_prefix(layout, logical),
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "error_cb": _log_error,
        "name": subjects.user(layout, logical),
        **options,
    }
    return await nats.connect(url, **settings)

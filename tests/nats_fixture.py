"""Pytest fixtures for a real, throwaway nats-server with JetStream (singularity_stack_testing/nats.py).

    nats_binary   session: Debian's nats-server
    nats_for      function: nats_for(layout, streams=True, ack_wait=...) starts a server whose users are the
                  stack's (sharedqueue/nats_permissions.py) plus `witness`, who may do anything (the tests'
                  eyes); with `streams` the owner creates the streams and consumers. Stopped after the test.

When nats-server is missing the tests are skipped with a loud reason naming `apt-get install nats-server`
(and a warning in the summary); with SINGULARITY_REQUIRE_NATS=1 (scripts/test.sh, CI) they fail instead.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from nats.aio.client import Client

from singularity_stack.sharedqueue import nats_permissions
from singularity_stack.sharedqueue.nats_connection import connect
from singularity_stack.sharedqueue.nats_streams import ensure_streams
from singularity_stack.topology import StackLayout
from singularity_stack_testing.nats import NatsServer, NatsServerMissing, find_nats_server

REQUIRE_ENV = "SINGULARITY_REQUIRE_NATS"
WITNESS = "witness"


@pytest.fixture(scope="session")
def nats_binary() -> str:
    try:
        return find_nats_server()
    except NatsServerMissing as exc:
        message = f"NO NATS-SERVER ON THIS MACHINE - NATS MIGRATION TESTS NOT RUN. {exc}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1)", pytrace=False)
    warnings.warn(message, stacklevel=1)
    pytest.skip(message)


@dataclass
class NatsStack:
    """A running nats-server for one stack, and connections to it as the stack's users."""

    server: NatsServer
    layout: StackLayout
    passwords: dict[str, str]
    witness_password: str
    _connections: list[Client] = field(default_factory=list)

    async def connect(self, logical: str, **options: object) -> Client:
        nc = await connect(self.server.url, self.layout, logical, self.passwords[logical], **options)
        self._connections.append(nc)
        return nc

    async def witness(self, **options: object) -> Client:
        import nats

        nc = await nats.connect(self.server.url, user=WITNESS, password=self.witness_password, **options)
        self._connections.append(nc)
        return nc

    async def close(self) -> None:
        for nc in reversed(self._connections):
            if not nc.is_closed:
                await nc.close()
        self.server.remove()


NatsFor = Callable[..., Awaitable[NatsStack]]


@pytest.fixture
async def nats_for(nats_binary: str) -> AsyncIterator[NatsFor]:
    stacks: list[NatsStack] = []

    async def start(layout: StackLayout, *, streams: bool = True, ack_wait: float = 30.0) -> NatsStack:
        passwords = {logical: secrets.token_urlsafe(18) for logical in layout.owners}
        witness_password = secrets.token_urlsafe(18)
        users = [*nats_permissions.users(layout, passwords), {"user": WITNESS, "password": witness_password}]
        server = NatsServer(users, binary=nats_binary).start()
        stack = NatsStack(server, layout, passwords, witness_password)
        stacks.append(stack)
        if streams:
            owner = await stack.connect(nats_permissions.OWNER)
            await ensure_streams(owner.jetstream(), layout, ack_wait=ack_wait)
        return stack

    yield start
    for stack in stacks:
        await stack.close()

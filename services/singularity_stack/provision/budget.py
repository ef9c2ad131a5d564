"""How many connections a stack may open to its PostgreSQL server: the number max_connections must fit.

Every service opens two pools (its own database and the shared queue) and one LISTEN connection;
CentralCloud also reads the archives through a small pool and opens one short-lived connection for
queue checks and pruning. Pools open lazily, so an idle stack uses far fewer, but the server must
admit the most the stack can ask for, or a busy moment ends in "too many clients" with nothing saying why.
On Kubernetes a rollout starts a new pod before the old one goes (maxSurge 1), so for the minutes it lasts
a rolling Deployment runs one pod more. That pod is not counted: it starts with empty pools while the old one
drains, and counting it would put a one-instance stack past the 100 connections PostgreSQL (and most hosted
servers) allow by default; `headroom` is the place to reserve for it where pools run full during upgrades.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import psycopg

from singularity_stack.topology import SHARED_SERVICES

SERVICE_POOL_SIZE = 10  # per pool, for each of Nexus, Genesis and CentralCloud
INSTANCE_POOL_SIZE = 4  # per pool, for each Singularity instance: N of them share the server
LISTEN_CONNECTIONS = 1
CENTRALCLOUD_EXTRA = 2 + 1  # the analytics pool, and one connection for queue checks and pruning
SUPERUSER_RESERVED = 3  # PostgreSQL's superuser_reserved_connections default
HEADROOM = 10  # the operator's provisioning (provisioner.MAX_CONNECTIONS: 5 at once), a psql session
MANAGED_STEP = 100  # managed max_connections is rounded up to this: a few more instances never restart it


@dataclass(frozen=True)
class PoolSizes:
    service: int = SERVICE_POOL_SIZE
    instance: int = INSTANCE_POOL_SIZE


@dataclass(frozen=True)
class Budget:
    instances: int
    stack: int  # what the stack's services may open at most
    headroom: int

    @property
    def required(self) -> int:
        """The max_connections a server needs for this stack alone."""
        return self.required_with(SUPERUSER_RESERVED)

    @property
    def managed_max_connections(self) -> int:
        return -(-self.required // MANAGED_STEP) * MANAGED_STEP

    def required_with(self, reserved: int) -> int:
        """The max_connections a server needs when `reserved` of them are kept from ordinary roles."""
        return self.stack + self.headroom + reserved

    def describe(self, reserved: int = SUPERUSER_RESERVED) -> str:
        return (
            f"{self.instances} Singularity instance(s) and the three services may open {self.stack} connections; "
            f"with {self.headroom} kept free and {reserved} reserved (superuser_reserved_connections and "
            f"reserved_connections) the server needs max_connections >= {self.required_with(reserved)}"
        )


def stack_budget(
    instances: int,
    pools: PoolSizes = PoolSizes(),
    headroom: int = HEADROOM,
    replicas: Mapping[str, int] | None = None,
) -> Budget:
    """`replicas`: processes (or pods) of a shared service, e.g. {"nexus": 2}; one each otherwise. Each
    opens its own pools, and a Nexus replica also listens for the others' HITL changes."""
    per_service = 2 * pools.service + LISTEN_CONNECTIONS
    per_instance = 2 * pools.instance + LISTEN_CONNECTIONS
    counts = {service: (replicas or {}).get(service, 1) for service in SHARED_SERVICES}
    total = sum(count * per_service for count in counts.values()) + CENTRALCLOUD_EXTRA + instances * per_instance
    total += counts["nexus"] * LISTEN_CONNECTIONS  # the HITL feed's connection (nexus/hitl_feed.py)
    return Budget(instances, total, headroom)


def pool_size_for(logical: str, pools: PoolSizes) -> int:
    """The size of each pool the service `logical` (a service name or an instance id) opens."""
    return pools.service if logical in SHARED_SERVICES else pools.instance


def server_limits(admin_dsn: str, connect_timeout: int = 5) -> tuple[int, int]:
    """An existing server's max_connections and how many of them ordinary roles (the services) cannot use:
    superuser_reserved_connections, plus reserved_connections (PostgreSQL 16+, for pg_use_reserved_connections)."""
    with psycopg.connect(admin_dsn, connect_timeout=connect_timeout) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int, current_setting('superuser_reserved_connections')::int"
            " + coalesce(current_setting('reserved_connections', true)::int, 0)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def budget_problem(budget: Budget, max_connections: int, reserved: int = SUPERUSER_RESERVED) -> str | None:
    """Why a server with `max_connections` (`reserved` of them kept from ordinary roles) cannot take this stack;
    None when it can."""
    if budget.required_with(reserved) <= max_connections:
        return None
    return f"{budget.describe(reserved)}, but the server allows {max_connections}: raise it, lower the pool sizes or N"

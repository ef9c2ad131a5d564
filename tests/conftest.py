"""Shared fixtures: one real throwaway PostgreSQL cluster for the session, and provisioned stacks on it."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from support import Stack

from singularity_stack.postgres.cluster import LocalCluster
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult
from singularity_stack.topology import StackLayout
from singularity_stack_testing.postgres import throwaway_cluster

# A real Kubernetes API server for the operator tests (tests/kube_fixture.py); a real nats-server for the
# NATS migration tests (tests/nats_fixture.py).
pytest_plugins = ["kube_fixture", "sandbox_support", "nats_fixture"]
_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    cluster = throwaway_cluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(cluster.datadir, ignore_errors=True)


@pytest.fixture(scope="session")
def admin_dsn(pg_cluster: LocalCluster) -> str:
    return pg_cluster.dsn()


ProvisionFn = Callable[..., ProvisionResult]


@pytest.fixture(scope="session")
def provision_stack(admin_dsn: str) -> ProvisionFn:
    """Provision a stack with its own name prefix, so stacks of different tests never meet."""

    def provision(instances: int = 1, prefix: str | None = None, **options: object) -> ProvisionResult:
        layout = StackLayout(instances, prefix if prefix is not None else f"t{next(_prefixes)}_")
        return Provisioner(admin_dsn, layout, report=lambda _: None, **options).run()  # type: ignore[arg-type]

    return provision


@pytest.fixture(scope="session")
def stack(provision_stack: ProvisionFn) -> ProvisionResult:
    """A shared stack with three Singularity instances, for tests that only read its layout."""
    return provision_stack(3)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory the unprivileged PostgreSQL account can reach (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="singularity-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_stack(provision_stack: ProvisionFn) -> ProvisionResult:
    """A stack of its own (one instance) for a test that changes queue contents."""
    return provision_stack(1)


@pytest.fixture
async def sq(fresh_stack: ProvisionResult) -> AsyncIterator[Stack]:
    handle = Stack(fresh_stack)
    yield handle
    await handle.close()


@pytest.fixture
async def open_stack(provision_stack: ProvisionFn) -> AsyncIterator[Callable[[int], Stack]]:
    """Provision stacks of N instances during a test; their clients are closed afterwards."""
    handles: list[Stack] = []

    def open_(instances: int) -> Stack:
        handles.append(Stack(provision_stack(instances)))
        return handles[-1]

    yield open_
    for handle in handles:
        await handle.close()

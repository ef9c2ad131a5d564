"""Shared fixtures: one real throwaway PostgreSQL cluster for the session, and provisioned stacks on it."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from singularity_stack.postgres.cluster import LocalCluster, throwaway_cluster
from singularity_stack.provision.provisioner import Provisioner, ProvisionResult
from singularity_stack.topology import StackLayout

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

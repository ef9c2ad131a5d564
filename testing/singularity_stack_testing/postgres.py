"""A throwaway PostgreSQL cluster: durability traded for speed, in a fresh temporary directory."""

from __future__ import annotations

import tempfile
from pathlib import Path

from singularity_stack.postgres.cluster import LocalCluster
from singularity_stack.postgres.installation import PostgresInstallation

FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def throwaway_cluster(installation: PostgresInstallation | None = None) -> LocalCluster:
    """A cluster in a fresh temporary directory, tuned for speed (fsync off). The caller removes the directory."""
    datadir = Path(tempfile.mkdtemp(prefix="singularity-pg-"))
    return LocalCluster(datadir, installation=installation, settings=FAST_SETTINGS)

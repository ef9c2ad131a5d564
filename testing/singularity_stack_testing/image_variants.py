"""Variants of the built image for upgrade tests and benches: one layer more, with extra migration files.

Built with buildah from the image scripts/build-images.sh made (same storage, CONTAINERS_STORAGE_CONF), then
imported into the running local node's containerd, as the suite imports the images themselves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from singularity_stack_testing.cluster import Cluster, run
from singularity_stack_testing.kube import containerd, localnode

MIGRATIONS_DIR = "/opt/singularity/lib/python3.11/site-packages/singularity_stack/migrations"
STORAGE_CONF = (
    Path(os.environ.get("SINGULARITY_IMAGE_CACHE", "/var/cache/singularity-stack")) / "containers/storage.conf"
)
KINDS = ("centralcloud", "genesis", "nexus", "singularity")


def build_variant(tmp: Path, base: str, tag: str, migrations: dict[str, str]) -> Path:
    """`FROM base` plus migration files ("<kind>/<id>.sql" → SQL), as a docker-archive."""
    context = tmp / tag.replace(":", "_")
    context.mkdir()
    lines = [f"FROM localhost/{base}"]
    for path, text in migrations.items():
        local = path.replace("/", "__")
        (context / local).write_text(text)
        lines.append(f"COPY {local} {MIGRATIONS_DIR}/{path}")
    (context / "Containerfile").write_text("\n".join(lines) + "\n")
    buildah = ["env", f"CONTAINERS_STORAGE_CONF={STORAGE_CONF}", "buildah"]
    containerfile = str(context / "Containerfile")
    run(*buildah, "bud", "--pull=never", "--isolation", "chroot", "-f", containerfile, "-t", tag, str(context))
    archive = tmp / f"{tag.replace(':', '_')}.tar"
    run(*buildah, "push", "--quiet", tag, f"docker-archive:{archive}:{tag}")
    return archive


def node_ctr() -> containerd.Ctr:
    """The running local node's containerd (one node at a time on this machine)."""
    sockets = sorted(localnode.run_parent().glob(localnode.RUN_DIR_PREFIX + "*/containerd/containerd.sock"))
    assert len(sockets) == 1, f"expected one running local node, found {sockets}"
    return containerd.Ctr(sockets[0])


def import_images(*archives: Path) -> set[str]:
    ctr = node_ctr()
    for archive in archives:
        ctr.import_archive(archive)
    return ctr.images()


def service_pods_on(cluster: Cluster, namespace: str, stack: str, image: str, count: int) -> bool:
    """`count` service Pods (no migration Job's, no PostgreSQL), every one on `image` and ready, none leaving."""
    pods: list[dict[str, Any]] = cluster.json(
        "get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={stack}"
    )["items"]
    services = [
        p
        for p in pods
        if "job-name" not in p["metadata"].get("labels", {})
        and p["metadata"]["labels"].get("app.kubernetes.io/component") != "postgres"
    ]
    return len(services) == count and all(
        p["spec"]["containers"][0]["image"] == image
        and not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        for p in services
    )

"""Cluster providers for the e2e suite, and installing the chart on whichever cluster they give.

- ``local``: the single-node cluster built on this machine (kube/localnode.py); images are built with
  buildah (scripts/build-images.sh) and imported into its containerd. Needs root, no Docker.
- ``kind``: a kind cluster made by pytest-kind's KindCluster, with the kind and kubectl on PATH (it downloads
  its pinned releases where they are missing); images are built with `docker build` and loaded with
  `kind load docker-image`. Needs a Docker engine.

Each provider is a generator that yields a :class:`Cluster` and tears everything down afterwards; when
it cannot run here it raises :class:`ProviderUnavailable` with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from pytest_kind.cluster import KIND_VERSION, KUBECTL_VERSION, KindCluster

from singularity_stack_testing import ROOT, manifests
from singularity_stack_testing.cluster import IMAGE, OPERATOR_NAMESPACE, POSTGRES_IMAGE, Cluster, run
from singularity_stack_testing.kube import localnode

PROVIDERS = ("local", "kind")
IMAGE_ARCHIVES = (f"{IMAGE.replace(':', '_')}.tar", f"{POSTGRES_IMAGE.replace(':', '_')}.tar")
KIND_IMAGES = ((IMAGE, "images/Dockerfile"), (POSTGRES_IMAGE, "images/postgres/Dockerfile"))
log = logging.getLogger(__name__)


class ProviderUnavailable(RuntimeError):
    """The provider cannot run on this machine; the message says why and what would fix it."""


def _docker_problem() -> str | None:
    """Why kind cannot run here (it runs its node as a container of a Docker engine), or None."""
    if shutil.which("docker") is None:
        return "docker not on PATH (kind runs its node in a Docker engine)"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        said = (probe.stderr.strip() or probe.stdout.strip()).splitlines()
        return f"the docker client is here but no Docker engine answers: {said[-1] if said else 'no message'}"
    return None


def kind_binaries(tmp: Path) -> tuple[Path, Path]:
    """(kind, kubectl): the ones on PATH; where one is missing, a path in `tmp` that KindCluster downloads its
    pinned release to (pytest-kind's KIND_VERSION, KUBECTL_VERSION) the first time it needs it."""
    kind, kubectl = shutil.which("kind"), shutil.which("kubectl")
    return (
        Path(kind) if kind else tmp / f"kind-{KIND_VERSION}",
        Path(kubectl) if kubectl else tmp / f"kubectl-{KUBECTL_VERSION}",
    )


def _kind(name: str, tmp: Path) -> KindCluster:
    kind, kubectl = kind_binaries(tmp)
    scratch = Path(".pytest-kind")
    existed = scratch.exists()
    cluster = KindCluster(name, kubeconfig=tmp / "kubeconfig", kind_path=kind, kubectl_path=kubectl)
    # KindCluster makes .pytest-kind/<name> in the working directory for what it downloads; every path is given
    # here, so nothing goes there: the empty folders go rather than litter the checkout.
    with contextlib.suppress(OSError):
        cluster.path.rmdir()
        if not existed:
            scratch.rmdir()
    return cluster


def kind_cluster(tmp: Path, timings: dict[str, float]) -> Iterator[Cluster]:
    """A kind cluster through pytest-kind's KindCluster, the project's images built with Docker and loaded into
    it (`kind load docker-image`); deleted afterwards, also when the body failed."""
    problem = _docker_problem()
    if problem:
        raise ProviderUnavailable(problem)
    kind = _kind(f"singularity-e2e-{os.getpid()}", tmp)
    started = time.monotonic()
    finished = False
    try:
        kind.create()
        kind.kubectl("wait", "--for=condition=Ready", "nodes", "--all", "--timeout=180s")
        timings["cluster start"] = time.monotonic() - started
        started = time.monotonic()
        for image, dockerfile in KIND_IMAGES:
            run("docker", "build", "-f", str(ROOT / dockerfile), "-t", image, str(ROOT), capture=False, timeout=1800)
            kind.load_docker_image(image)
        timings["image build and load"] = time.monotonic() - started
        yield Cluster(kind.kubeconfig_path, provider="kind", kubectl_binary=str(kind.kubectl_path))
        finished = True
    finally:
        started = time.monotonic()
        try:
            kind.delete()
        except subprocess.CalledProcessError:
            if finished:
                raise
            # the body's own error is the one to see; the cluster's name says what to delete by hand
            log.exception("could not delete kind cluster %s", kind.name)
        timings["cluster teardown"] = time.monotonic() - started


def build_image_archives(out_dir: Path) -> list[Path]:
    """Both images as docker-archives, built from images/ with buildah (layer-cached after the first build)."""
    run("bash", str(ROOT / "scripts" / "build-images.sh"), str(out_dir), capture=False, timeout=1800)
    return [out_dir / name for name in IMAGE_ARCHIVES]


def local_cluster(tmp: Path, timings: dict[str, float]) -> Iterator[Cluster]:
    reason = localnode.unavailable_reason()
    if reason:
        raise ProviderUnavailable(reason)
    started = time.monotonic()
    archives = build_image_archives(tmp / "images")
    timings["image build"] = time.monotonic() - started
    node = localnode.LocalNode()
    node.start()
    timings["cluster start"] = node.timings["start"]
    try:
        started = time.monotonic()
        for archive in archives:
            node.load_image(archive)
        timings["image import"] = time.monotonic() - started
        missing = [image for image in (IMAGE, POSTGRES_IMAGE) if f"docker.io/library/{image}" not in node.ctr.images()]
        if missing:
            raise AssertionError(f"{', '.join(missing)} not in the node's containerd after importing {archives}")
        yield Cluster(node.kubeconfig, provider="local", kubectl_binary=str(node.binaries.kubectl), routable=True,
                      node_diagnostics=node.diagnostics, memory_rss=node.memory_rss)  # fmt: skip
    finally:
        node.stop()
        timings["cluster teardown"] = node.timings.get("stop", 0.0)
    # Checked only after a clean run: an error raised above must not be masked by its consequences.
    leftovers = node.leftovers()
    if leftovers:
        raise AssertionError(f"the local node's teardown left: {leftovers}")


def install_chart(cluster: Cluster, values: dict | None = None) -> None:
    """The chart, rendered by Helm's own engine (the helm-python-sdk wheel), applied with kubectl; then wait for
    the operator Deployment to be available. (No helm CLI needed: Debian does not package one.)"""
    # As `helm install` renders for the cluster's version: below 1.25 the CRD goes without its CEL rules.
    server = cluster.json("version")["serverVersion"]["gitVersion"]
    rendered = manifests.render_templates(values or {}, server, namespace=OPERATOR_NAMESPACE)
    docs = [doc for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]  # fmt: skip
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    crds = [doc for doc in docs if doc["kind"] == "CustomResourceDefinition"]
    cluster.apply(crds)
    for crd in crds:
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}")
    cluster.kubectl("apply", "-n", OPERATOR_NAMESPACE, "-f", "-",
                    stdin=yaml.safe_dump_all([doc for doc in docs if doc not in crds]))  # fmt: skip
    cluster.kubectl(
        "wait", "-n", OPERATOR_NAMESPACE, "--for=condition=Available", "deployment", "--all", "--timeout=300s"
    )


def operator_pods(cluster: Cluster, ready: bool = False) -> list[str]:
    pods = cluster.json("get", "pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/name=singularity-operator")
    names = []
    for pod in pods["items"]:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        conditions = pod.get("status", {}).get("conditions", [])
        if not ready or any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            names.append(pod["metadata"]["name"])
    return names

"""End-to-end suite on a real cluster: the project's image, the Helm chart, a SingularityStack, a task.

    .venv/bin/python -m pytest e2e            # needs Docker, kind, helm and kubectl on PATH

The cluster provider is chosen with `--cluster-provider` or $SINGULARITY_E2E_PROVIDER; today `kind`
(Docker). Where a provider's tools are missing the suite skips, saying which. On failure it prints what
a person needs: pod states, events, and the logs of the operator and the services.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import IMAGE, OPERATOR_NAMESPACE, POSTGRES_IMAGE, ROOT, Cluster, run


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster-provider", default=os.environ.get("SINGULARITY_E2E_PROVIDER", "kind"))


def _missing(*tools: str) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def _kind_cluster(tmp: Path) -> Iterator[Cluster]:
    missing = _missing("docker", "kind", "helm", "kubectl")
    if missing:
        pytest.skip(f"KIND E2E SKIPPED: {', '.join(missing)} not on PATH (kind needs a Docker engine)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.skip("KIND E2E SKIPPED: the docker client is here but no Docker engine answers")
    name = f"singularity-e2e-{os.getpid()}"
    kubeconfig = tmp / "kubeconfig"
    run("kind", "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig), "--wait", "180s", capture=False)
    try:
        for image, dockerfile in ((IMAGE, "images/Dockerfile"), (POSTGRES_IMAGE, "images/postgres/Dockerfile")):
            run("docker", "build", "-f", str(ROOT / dockerfile), "-t", image, str(ROOT), capture=False)
            run("kind", "load", "docker-image", image, "--name", name, capture=False)
        yield Cluster(kubeconfig)
    finally:
        run("kind", "delete", "cluster", "--name", name, check=False)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    provider = request.config.getoption("--cluster-provider")
    if provider != "kind":
        pytest.skip(f"E2E SKIPPED: cluster provider {provider!r} is not available yet (only 'kind')")
    yield from _kind_cluster(tmp_path_factory.mktemp("e2e"))


@pytest.fixture(scope="session")
def operator_installed(cluster: Cluster) -> Cluster:
    run(
        "helm", "install", "ops", str(ROOT / "charts" / "singularity-stack"),
        "--kubeconfig", str(cluster.kubeconfig), "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", "image.pullPolicy=Never", "--wait", "--timeout", "5m",
    )  # fmt: skip
    return cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.failed and "cluster" in getattr(item, "funcargs", {}):
        report.sections.append(("cluster diagnostics", item.funcargs["cluster"].diagnostics()))
    return report

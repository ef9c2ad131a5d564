"""End-to-end suite on a real cluster: the project's images, the Helm chart, SingularityStacks, a task.

    .venv/bin/python -m pytest e2e                            # the local node (root; what CI runs)
    .venv/bin/python -m pytest e2e --cluster-provider=kind    # kind via pytest-kind (a Docker engine; kind and
                                                              # kubectl from PATH, else pytest-kind downloads them)

The provider is chosen with `--cluster-provider` or $SINGULARITY_E2E_PROVIDER (default `local`, the
single-node cluster of singularity_stack_testing.kube.localnode). Where a provider cannot run the suite
skips, saying why; with SINGULARITY_REQUIRE_KUBE=1 (CI) it fails instead. On failure it prints what a person needs: pod
states, events, and the logs of the operator, the services and the node's components.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from singularity_stack_testing.cluster import TIMINGS, Cluster
from singularity_stack_testing.providers import (
    PROVIDERS,
    ProviderUnavailable,
    install_chart,
    kind_cluster,
    local_cluster,
)

REQUIRE_ENV = "SINGULARITY_REQUIRE_KUBE"


# Modules that start a local node of their own: they run before any test that needs the shared cluster,
# whose node stays up for the rest of the session and would be "another local node" to them.
OWN_NODE_MODULES = frozenset({"test_local_node.py"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in OWN_NODE_MODULES)  # stable: the rest keep their order


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster-provider",
        default=os.environ.get("SINGULARITY_E2E_PROVIDER", "local"),
        choices=PROVIDERS,
        help="where the e2e suite runs: 'local' (a node built on this machine, needs root) or 'kind' (Docker)",
    )


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    provider = request.config.getoption("--cluster-provider")
    start = local_cluster if provider == "local" else kind_cluster
    clusters = start(tmp_path_factory.mktemp("e2e"), TIMINGS)
    try:
        cluster = next(clusters)
    except ProviderUnavailable as exc:
        message = f"E2E SUITE NOT RUN: cluster provider {provider!r} cannot run here: {exc}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1)", pytrace=False)
        pytest.skip(message)
    yield cluster
    # Runs the provider's teardown, which fails the session if the node left anything behind.
    next(clusters, None)


@pytest.fixture(scope="session")
def operator_installed(cluster: Cluster) -> Cluster:
    install_chart(cluster)
    return cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    funcargs = getattr(item, "funcargs", {})
    cluster = funcargs.get("cluster") or funcargs.get("operator_installed")
    if report.failed and isinstance(cluster, Cluster):
        report.sections.append(("cluster diagnostics", cluster.diagnostics()))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("e2e timings")
        for step, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{step:<40} {seconds:7.1f} s")

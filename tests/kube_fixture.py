"""Pytest fixtures for a real, throwaway Kubernetes API server (see singularity_stack_testing/kube/apiserver.py).

    kube_binaries  session: the cached kube-apiserver/kube-controller-manager and Debian's etcd
    kube           session: a running ControlPlane (etcd + kube-apiserver); call
                   kube.start_controller_manager() in tests that need garbage collection or namespace deletion
    make_kube      function: make_kube(with_controller_manager=False, **ControlPlane options) starts another,
                   separate control plane (own ports, own etcd); all are stopped after the test

Load it with ``pytest_plugins = ["kube_fixture"]`` (in tests/conftest.py, or in a test module).

When the binaries are missing the tests are skipped with a loud reason naming scripts/build-kubernetes.sh
(and a warning in the summary); with SINGULARITY_REQUIRE_KUBE=1 (for CI, after running that script) they fail.
"""

from __future__ import annotations

import os
import urllib.request
import warnings
from collections.abc import Callable, Iterator

import pytest

from singularity_stack_testing.kube.apiserver import Binaries, BinariesMissing, ControlPlane, find_binaries

REQUIRE_ENV = "SINGULARITY_REQUIRE_KUBE"


@pytest.fixture(scope="session")
def kube_binaries() -> Binaries:
    try:
        return find_binaries()
    except BinariesMissing as exc:
        message = f"NO KUBERNETES API SERVER BUILT ON THIS MACHINE - KUBERNETES TESTS NOT RUN. {exc}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{message} ({REQUIRE_ENV}=1)", pytrace=False)
    warnings.warn(message, stacklevel=1)
    pytest.skip(message)


def _bypass_proxy_for_loopback() -> None:
    # The kubernetes client honours HTTPS_PROXY from the environment; the control plane is on 127.0.0.1.
    if not set(urllib.request.getproxies()) - {"no"}:
        return
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [host for host in os.environ.get(name, "").split(",") if host]
        if "127.0.0.1" not in hosts:
            os.environ[name] = ",".join([*hosts, "127.0.0.1"])


@pytest.fixture(scope="session")
def kube(kube_binaries: Binaries) -> Iterator[ControlPlane]:
    _bypass_proxy_for_loopback()
    plane = ControlPlane(kube_binaries).start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def make_kube(kube_binaries: Binaries) -> Iterator[Callable[..., ControlPlane]]:
    planes: list[ControlPlane] = []

    def make(with_controller_manager: bool = False, **options: object) -> ControlPlane:
        _bypass_proxy_for_loopback()
        planes.append(ControlPlane(kube_binaries, **options))  # type: ignore[arg-type]
        return planes[-1].start(with_controller_manager)

    yield make
    for plane in planes:
        plane.stop()

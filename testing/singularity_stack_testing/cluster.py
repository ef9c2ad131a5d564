"""A cluster under test as the e2e suite and the benchmarks see it: running tools, talking to it, waiting."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from singularity_stack.postgres.cluster import free_port
from singularity_stack_testing import ROOT

IMAGE = "singularity-stack:0.1.0"
POSTGRES_IMAGE = "singularity-stack-postgres:0.1.0"
OPERATOR_NAMESPACE = "singularity-system"
CHART = ROOT / "charts" / "singularity-stack"
EXAMPLE = CHART / "examples" / "singularitystack.yaml"
# Figures the suite measures on the way (cluster start, apply -> Ready, ...), printed at the end of the run.
TIMINGS: dict[str, float] = {}


def run(*args: str, check: bool = True, capture: bool = True, timeout: float = 900, stdin: str | None = None) -> str:
    result = subprocess.run(args, capture_output=capture, text=True, timeout=timeout, input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout if capture else ""


@dataclass
class Cluster:
    """A running cluster as the suite sees it: a kubeconfig, the kubectl to use, and how to reach Services.

    ``routable`` clusters (the local node) let the host open Services' ClusterIPs directly; others (kind) are
    reached through `kubectl port-forward`.
    """

    kubeconfig: Path
    provider: str
    kubectl_binary: str = "kubectl"
    routable: bool = False
    node_diagnostics: Callable[[], str] = field(default=lambda: "")
    # Resident memory of the node's components and Pods, where the provider can tell.
    memory_rss: Callable[[], dict[str, int]] = field(default=dict)

    def kubectl(self, *args: str, check: bool = True, stdin: str | None = None) -> str:
        return run(self.kubectl_binary, "--kubeconfig", str(self.kubeconfig), *args, check=check, stdin=stdin)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]]) -> str:
        items = manifest if isinstance(manifest, list) else [manifest]
        return self.kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    @contextlib.contextmanager
    def service_address(self, namespace: str, service: str, port: int) -> Iterator[tuple[str, int]]:
        """(host, port) where the host reaches ``service``'s ``port``."""
        if self.routable:
            cluster_ip = self.json("get", "service", service, "-n", namespace)["spec"]["clusterIP"]
            yield cluster_ip, port
            return
        local = free_port()
        argv = [self.kubectl_binary, "--kubeconfig", str(self.kubeconfig), "port-forward", "-n", namespace]
        process = subprocess.Popen(
            [*argv, f"svc/{service}", f"{local}:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_until(f"port-forward to {service}", lambda: _accepts("127.0.0.1", local), 60)
            yield "127.0.0.1", local
        finally:
            process.terminate()
            process.wait(10)

    def diagnostics(self) -> str:
        """Pod states, events, the logs of the operator and every service, and the node's own logs."""
        parts = [self.kubectl("get", "pods", "-A", "-o", "wide", check=False)]
        parts.append(self.kubectl("get", "singularitystacks", "-A", "-o", "yaml", check=False))
        parts.append(self.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp", check=False))
        for namespace in (OPERATOR_NAMESPACE, "default"):
            pods = self.kubectl("get", "pods", "-n", namespace, "-o", "name", check=False).split()
            for pod in pods:
                parts.append(f"--- logs {namespace}/{pod} ---")
                parts.append(self.kubectl("logs", "-n", namespace, pod, "--all-containers", "--tail=80", check=False))
        parts.append(self.node_diagnostics())
        return "\n".join(parts)


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=2):
        return True
    return False


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)

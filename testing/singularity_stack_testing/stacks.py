"""SingularityStacks on a cluster under test: the example stack, its status, its Pods, waiting for Ready."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from singularity_stack_testing.cluster import EXAMPLE, Cluster, wait_until

STACK = "example"
NAMESPACE = "default"
READY_TIMEOUT = 600


def example(name: str = STACK, replicas: int = 1, deletion_policy: str = "Retain") -> dict[str, Any]:
    stack = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    stack["metadata"] = {"name": name, "namespace": NAMESPACE}
    stack["spec"]["singularity"]["replicas"] = replicas
    stack["spec"]["deletionPolicy"] = deletion_policy
    return stack


def stack_status(cluster: Cluster, name: str) -> dict[str, Any]:
    stack = cluster.json("get", "singularitystack", name, "-n", NAMESPACE)
    return {**stack.get("status", {}), "generation": stack["metadata"]["generation"]}


def ready(cluster: Cluster, name: str) -> bool:
    """Ready=True for the stack's current generation."""
    status = stack_status(cluster, name)
    conditions = status.get("conditions", [])
    return status.get("observedGeneration") == status["generation"] and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions
    )


def stack_pods(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={name}"
    return cluster.json("get", "pods", "-n", NAMESPACE, "-l", selector)["items"]


def all_running(cluster: Cluster, name: str, expected: int) -> bool:
    pods = [pod for pod in stack_pods(cluster, name) if not pod["metadata"].get("deletionTimestamp")]
    return len(pods) == expected and all(pod["status"].get("phase") == "Running" for pod in pods)


def wait_ready(cluster: Cluster, name: str, pods: int) -> None:
    wait_until(f"{name} to be Ready", lambda: ready(cluster, name), READY_TIMEOUT)
    wait_until(f"{pods} Pods of {name} Running", lambda: all_running(cluster, name, pods), READY_TIMEOUT)


# Pods of a stack beside its Singularity instances: PostgreSQL, Nexus, Genesis, CentralCloud.
OTHER_PODS = 4

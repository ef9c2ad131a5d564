"""On a real cluster: the operator runs as a Pod from the project's image and runs SingularityStacks for real.

The tests run in file order and share one stack: apply → Ready → a task → scale 1 → 3 → operator killed
mid-reconcile → delete (Retain); then a second stack is deleted with the Delete policy.
"""

from __future__ import annotations

import base64
import time

import httpx
import psycopg
import pytest

from singularity_stack_testing.cluster import IMAGE, OPERATOR_NAMESPACE, TIMINGS, Cluster, wait_until
from singularity_stack_testing.providers import operator_pods
from singularity_stack_testing.stacks import (
    NAMESPACE,
    OTHER_PODS,
    STACK,
    example,
    stack_pods,
    stack_status,
    wait_ready,
)

# The first test also waits for the images to build and the cluster to start.
pytestmark = pytest.mark.timeout(1800)


def secret_value(cluster: Cluster, name: str, key: str) -> str:
    return base64.b64decode(cluster.json("get", "secret", name, "-n", NAMESPACE)["data"][key]).decode()


def databases(cluster: Cluster, name: str) -> set[str]:
    password = secret_value(cluster, f"{name}-postgres-admin", "POSTGRES_PASSWORD")
    with cluster.service_address(NAMESPACE, f"{name}-postgres", 5432) as (host, port):
        dsn = f"host={host} port={port} user=postgres password={password} dbname=postgres connect_timeout=10"
        with psycopg.connect(dsn) as conn:
            return {row[0] for row in conn.execute("SELECT datname FROM pg_database WHERE NOT datistemplate")}


def singularity_deployments(cluster: Cluster, name: str) -> list[str]:
    items = cluster.json("get", "deployments", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={name}")["items"]
    return sorted(d["metadata"]["name"] for d in items if "-singularity-" in d["metadata"]["name"])


def test_the_operator_runs_as_a_pod_from_the_project_image(operator_installed: Cluster) -> None:
    (pod,) = operator_pods(operator_installed, ready=True)
    spec = operator_installed.json("get", "pod", pod, "-n", OPERATOR_NAMESPACE)["spec"]
    assert spec["containers"][0]["image"] == IMAGE
    assert spec["containers"][0]["args"][0] == "operator"


def test_the_example_stack_with_managed_postgres_becomes_ready(operator_installed: Cluster) -> None:
    cluster = operator_installed
    started = time.monotonic()
    cluster.apply(example(replicas=1))
    wait_ready(cluster, STACK, OTHER_PODS + 1)
    TIMINGS["example stack apply -> Ready (N=1)"] = time.monotonic() - started
    conditions = {c["type"]: c["status"] for c in stack_status(cluster, STACK)["conditions"]}
    assert conditions == dict.fromkeys(
        ("DatabasesReady", "QueueReady", "MigrationsSucceeded", "ServicesAvailable", "Ready"), "True"
    )


def test_a_task_runs_through_the_live_system(operator_installed: Cluster) -> None:
    cluster = operator_installed
    token = secret_value(cluster, f"{STACK}-nexus-ui", "NEXUS_UI_TOKEN")
    api_token = secret_value(cluster, f"{STACK}-singularity-api", "SINGULARITY_API_TOKEN")
    with (
        cluster.service_address(NAMESPACE, f"{STACK}-singularity-1", 8000) as singularity,
        cluster.service_address(NAMESPACE, f"{STACK}-nexus", 8000) as nexus,
    ):
        # The services answer only to their Service's DNS names (and loopback): the host reaches them by
        # ClusterIP or a port-forward, so it says which name it means.
        singularity_api = httpx.Client(
            base_url=f"http://{singularity[0]}:{singularity[1]}",
            headers={
                "Host": f"{STACK}-singularity-1.{NAMESPACE}.svc",
                "Authorization": f"Bearer {api_token}",
            },
            timeout=10,
        )
        nexus_api = httpx.Client(
            base_url=f"http://{nexus[0]}:{nexus[1]}",
            headers={"Host": f"{STACK}-nexus.{NAMESPACE}.svc", "Authorization": f"Bearer {token}"},
            timeout=10,
        )
        stranger = httpx.post(f"http://{singularity[0]}:{singularity[1]}/tasks", json={"description": "x"})
        # A ClusterIP is no name of ours (400); through a port-forward, loopback is, but the token is missing.
        assert stranger.status_code == (400 if cluster.routable else 401), stranger.text
        unauthenticated = singularity_api.post(
            "/tasks", json={"description": "x"}, headers={"Authorization": "Bearer wrong"}
        )
        assert unauthenticated.status_code == 401, unauthenticated.text
        created = singularity_api.post("/tasks", json={"description": "Write a program that prints a greeting"})
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]

        def pending_approval() -> dict | None:
            approvals = nexus_api.get("/api/pending").json()["approvals"]
            return next((a for a in approvals if a["instance"] == "singularity_1"), None)

        card = wait_until("the approval card in Nexus", pending_approval, 300)
        approved = nexus_api.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""})
        assert approved.status_code == 200, approved.text

        def finished() -> dict | None:
            task = singularity_api.get(f"/tasks/{task_id}").json()
            return task if task["state"] in ("succeeded", "failed") else None

        task = wait_until("the task to finish", finished, 300)
        assert task["state"] == "succeeded", task.get("failure_reason")
        assert len(task["steps"]) == 7


def test_scaling_to_three_gives_each_new_instance_its_own_database(operator_installed: Cluster) -> None:
    cluster = operator_installed
    before = databases(cluster, STACK)
    cluster.kubectl("patch", "singularitystack", STACK, "-n", NAMESPACE, "--type=merge",
                    "-p", '{"spec": {"singularity": {"replicas": 3}}}')  # fmt: skip
    wait_ready(cluster, STACK, OTHER_PODS + 3)
    assert singularity_deployments(cluster, STACK) == [f"{STACK}-singularity-{i}" for i in (1, 2, 3)]
    added = databases(cluster, STACK) - before
    # Exactly the two new instances' databases (named ..._singularity_<i>, with the stack's prefix if any).
    assert sorted(db.rsplit("_", 2)[-2:] for db in added) == [["singularity", "2"], ["singularity", "3"]], added


def test_the_operator_killed_mid_reconcile_recovers_without_duplicates(operator_installed: Cluster) -> None:
    cluster = operator_installed
    secrets_before = {
        name: secret_value(cluster, name, "DATABASE_URL") for name in (f"{STACK}-singularity-{i}-db" for i in (1, 2, 3))
    }
    (old_pod,) = operator_pods(cluster, ready=True)
    cluster.kubectl("patch", "singularitystack", STACK, "-n", NAMESPACE, "--type=merge",
                    "-p", '{"spec": {"singularity": {"replicas": 2}}}')  # fmt: skip
    cluster.kubectl("delete", "pod", old_pod, "-n", OPERATOR_NAMESPACE, "--grace-period=0", "--force", check=False)
    wait_until("a new operator Pod", lambda: [p for p in operator_pods(cluster, ready=True) if p != old_pod], 300)
    wait_ready(cluster, STACK, OTHER_PODS + 2)
    assert singularity_deployments(cluster, STACK) == [f"{STACK}-singularity-1", f"{STACK}-singularity-2"]
    # No password was generated twice: every instance's credentials are the ones it had.
    assert {name: secret_value(cluster, name, "DATABASE_URL") for name in secrets_before} == secrets_before
    # Scaling down keeps the data (Retain): the third instance's database is still there.
    assert any(db.endswith("singularity_3") for db in databases(cluster, STACK))


def test_deleting_with_retain_keeps_the_data(operator_installed: Cluster) -> None:
    cluster = operator_installed
    cluster.kubectl("delete", "singularitystack", STACK, "-n", NAMESPACE, "--wait=true", "--timeout=5m")
    wait_until("the stack's Pods to go", lambda: not stack_pods(cluster, STACK), 300)
    claims = cluster.json("get", "pvc", "-n", NAMESPACE)["items"]
    assert f"data-{STACK}-postgres-0" in [claim["metadata"]["name"] for claim in claims]


def test_deleting_with_delete_drops_the_data(operator_installed: Cluster) -> None:
    cluster, name = operator_installed, "doomed"
    cluster.apply(example(name, replicas=1, deletion_policy="Delete"))
    wait_ready(cluster, name, OTHER_PODS + 1)
    cluster.kubectl("delete", "singularitystack", name, "-n", NAMESPACE, "--wait=true", "--timeout=5m")
    wait_until("the stack's Pods to go", lambda: not stack_pods(cluster, name), 300)
    claims = cluster.json("get", "pvc", "-n", NAMESPACE)["items"]
    assert f"data-{name}-postgres-0" not in [claim["metadata"]["name"] for claim in claims]
    assert not cluster.json("get", "secrets", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={name}")["items"]

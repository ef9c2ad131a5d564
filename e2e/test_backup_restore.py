"""Backups and restore on a real cluster: a stack with spec.backup does a task; a backup is taken (a Job from
its CronJob, as `kubectl create job --from=cronjob/...`); the stack is deleted with the Delete policy (its
PostgreSQL volume goes, the backups' claim stays); a new stack restored from the backup
(spec.postgres.managed.restoreFrom) has the old task, and a new task completes on it."""

from __future__ import annotations

import base64
import time
from typing import Any

import httpx
import pytest

from singularity_stack_testing.cluster import TIMINGS, Cluster, wait_until
from singularity_stack_testing.stacks import NAMESPACE, OTHER_PODS, READY_TIMEOUT, example, ready, stack_status

pytestmark = pytest.mark.timeout(2400)
OLD, NEW = "vault", "vault-restored"
CLAIM = f"{OLD}-backups"


def secret_value(cluster: Cluster, name: str, key: str) -> str:
    return base64.b64decode(cluster.json("get", "secret", name, "-n", NAMESPACE)["data"][key]).decode()


def service_pods(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    """The stack's long-running Pods (its backup and restore Jobs' Pods left out)."""
    selector = f"app.kubernetes.io/instance={name},app.kubernetes.io/component notin (backup,restore)"
    pods = cluster.json("get", "pods", "-n", NAMESPACE, "-l", selector)["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def wait_serving(cluster: Cluster, name: str) -> None:
    wait_until(f"{name} to be Ready", lambda: ready(cluster, name), READY_TIMEOUT)
    wait_until(
        f"{name}'s Pods Running",
        lambda: (
            (pods := service_pods(cluster, name))
            and len(pods) == OTHER_PODS + 1
            and all(p["status"].get("phase") == "Running" for p in pods)
        ),
        READY_TIMEOUT,
    )


def run_task(cluster: Cluster, name: str, description: str) -> str:
    """A task through the live system, approved in Nexus: its id, once it succeeded."""
    ui = secret_value(cluster, f"{name}-nexus-ui", "NEXUS_UI_TOKEN")
    token = secret_value(cluster, f"{name}-singularity-api", "SINGULARITY_API_TOKEN")
    with (
        cluster.service_address(NAMESPACE, f"{name}-singularity-1", 8000) as singularity,
        cluster.service_address(NAMESPACE, f"{name}-nexus", 8000) as nexus,
    ):
        tasks = httpx.Client(
            base_url=f"http://{singularity[0]}:{singularity[1]}",
            headers={"Host": f"{name}-singularity-1.{NAMESPACE}.svc", "Authorization": f"Bearer {token}"},
            timeout=10,
        )
        hitl = httpx.Client(
            base_url=f"http://{nexus[0]}:{nexus[1]}",
            headers={"Host": f"{name}-nexus.{NAMESPACE}.svc", "Authorization": f"Bearer {ui}"},
            timeout=10,
        )
        created = tasks.post("/tasks", json={"description": description})
        assert created.status_code == 202, created.text
        task_id = str(created.json()["id"])

        def pending() -> dict[str, Any] | None:
            approvals = hitl.get("/api/pending").json()["approvals"]
            return next((a for a in approvals if a["instance"] == "singularity_1"), None)

        card = wait_until("the approval card in Nexus", pending, 300)
        approved = hitl.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""})
        assert approved.status_code == 200, approved.text

        def finished() -> dict[str, Any] | None:
            task = tasks.get(f"/tasks/{task_id}").json()
            return task if task["state"] in ("succeeded", "failed") else None

        task = wait_until("the task to finish", finished, 300)
        assert task["state"] == "succeeded", task.get("failure_reason")
        return task_id


def get_task(cluster: Cluster, name: str, task_id: str) -> dict[str, Any]:
    token = secret_value(cluster, f"{name}-singularity-api", "SINGULARITY_API_TOKEN")
    with cluster.service_address(NAMESPACE, f"{name}-singularity-1", 8000) as (host, port):
        answer = httpx.get(
            f"http://{host}:{port}/tasks/{task_id}",
            headers={"Host": f"{name}-singularity-1.{NAMESPACE}.svc", "Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())


def job_done(cluster: Cluster, job: str) -> bool:
    conditions = (cluster.json("get", "job", job, "-n", NAMESPACE).get("status") or {}).get("conditions") or []
    failed = [c for c in conditions if c["type"] == "Failed" and c["status"] == "True"]
    assert not failed, f"Job {job} failed: {failed}\n" + cluster.kubectl(
        "logs", f"job/{job}", "-n", NAMESPACE, check=False
    )
    return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)


def test_a_stack_backed_up_deleted_and_restored_has_its_tasks_and_runs_new_ones(operator_installed: Cluster) -> None:
    cluster = operator_installed
    stack = example(OLD, replicas=1, deletion_policy="Delete")
    stack["spec"]["backup"] = {"schedule": "0 3 * * *", "retention": 3, "volume": {"size": "1Gi"}}
    cluster.apply(stack)
    wait_serving(cluster, OLD)
    old_task = run_task(cluster, OLD, "Write a program that prints a greeting")
    before = get_task(cluster, OLD, old_task)

    started = time.monotonic()
    cluster.kubectl("create", "job", f"{OLD}-backup-now", f"--from=cronjob/{OLD}-backup", "-n", NAMESPACE)
    wait_until("the backup Job", lambda: job_done(cluster, f"{OLD}-backup-now"), 600)
    TIMINGS["backup Job (N=1, one task)"] = time.monotonic() - started
    shown = wait_until(
        "status.backup to show the backup",
        lambda: (b := stack_status(cluster, OLD).get("backup") or {}).get("job") == f"{OLD}-backup-now" and b,
        120,
    )
    assert shown["lastBackupSucceeded"] is True and shown["sizeBytes"] > 10_000, shown
    assert shown["claimName"] == CLAIM

    cluster.kubectl("delete", "singularitystack", OLD, "-n", NAMESPACE, "--wait=true", "--timeout=5m")
    wait_until("the old stack's Pods to go", lambda: not service_pods(cluster, OLD), 300)

    def claims() -> list[str]:
        return [c["metadata"]["name"] for c in cluster.json("get", "pvc", "-n", NAMESPACE)["items"]]

    # the data goes (once its Pod is gone, the claim's protection lets it), the backups stay
    wait_until("the old PostgreSQL volume to go", lambda: f"data-{OLD}-postgres-0" not in claims(), 180)
    assert CLAIM in claims()

    restored = example(NEW, replicas=1, deletion_policy="Delete")
    restored["spec"]["postgres"]["managed"]["restoreFrom"] = {"claimName": CLAIM, "backup": shown["lastBackup"]}
    started = time.monotonic()
    cluster.apply(restored)
    wait_serving(cluster, NEW)
    TIMINGS["restore: apply -> Ready (N=1)"] = time.monotonic() - started
    assert (stack_status(cluster, NEW).get("backup") or {}).get("restored") == shown["lastBackup"]
    after = get_task(cluster, NEW, old_task)
    assert after["state"] == "succeeded" and after["description"] == before["description"]
    assert [s["name"] for s in after["steps"]] == [s["name"] for s in before["steps"]]
    assert after["steps"] == before["steps"]  # every request and reply, the human approval included
    run_task(cluster, NEW, "Write a program that prints a farewell")

    cluster.kubectl("delete", "singularitystack", NEW, "-n", NAMESPACE, "--wait=true", "--timeout=5m")
    cluster.kubectl("delete", "pvc", CLAIM, "-n", NAMESPACE, "--wait=false")
    for name in (OLD, NEW):  # every Pod gone (the Jobs' too) before the node is torn down
        selector = f"app.kubernetes.io/instance={name}"
        wait_until(
            f"{name}'s Pods to go",
            lambda s=selector: not cluster.json("get", "pods", "-n", NAMESPACE, "-l", s)["items"],
            300,
        )
    wait_until("the backups' claim to go", lambda: CLAIM not in claims(), 180)

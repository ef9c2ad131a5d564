"""On a real cluster: the example SingularityStack becomes Ready and runs one task to completion."""

from __future__ import annotations

import base64
import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from e2e_support import ROOT, Cluster, wait_until

EXAMPLE = ROOT / "charts" / "singularity-stack" / "examples" / "singularitystack.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def port_forward(cluster: Cluster, service: str) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "port-forward", f"svc/{service}", f"{port}:8000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(f"port-forward to {service}", lambda: _answers(url), 60)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def ready(cluster: Cluster, name: str) -> bool:
    conditions = cluster.json("get", "singularitystack", name).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_example_stack_runs_a_task_end_to_end(operator_installed: Cluster, tmp_path: Path) -> None:
    cluster = operator_installed
    cluster.kubectl("apply", "-f", str(EXAMPLE))
    wait_until("the example stack to be Ready", lambda: ready(cluster, "example"), 900)

    token_b64 = cluster.json("get", "secret", "example-nexus-ui")["data"]["NEXUS_UI_TOKEN"]
    token = base64.b64decode(token_b64).decode()
    with port_forward(cluster, "example-singularity-1") as singularity, port_forward(cluster, "example-nexus") as nexus:
        created = httpx.post(f"{singularity}/tasks", json={"description": "Write a program that prints a greeting"})
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        api = httpx.Client(base_url=nexus, headers={"Authorization": f"Bearer {token}"}, timeout=10)

        def pending_approval() -> dict | None:
            approvals = api.get("/api/pending").json()["approvals"]
            return next((a for a in approvals if a["instance"] == "singularity_1"), None)

        card = wait_until("the approval card", pending_approval, 300)
        assert (
            api.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""}).status_code == 200
        )

        def finished() -> dict | None:
            task = httpx.get(f"{singularity}/tasks/{task_id}", timeout=10).json()
            return task if task["state"] in ("succeeded", "failed") else None

        task = wait_until("the task to finish", finished, 300)
        assert task["state"] == "succeeded", task.get("failure_reason")
        assert len(task["steps"]) == 7

    cluster.kubectl("delete", "-f", str(EXAMPLE), "--wait=true", "--timeout=5m")
    time.sleep(1)

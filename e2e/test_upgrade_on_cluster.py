"""On the local node: an image bump is gated by the new image's migrations, run as Jobs from that image.

Two variants of the built image, each one layer more (buildah, from the image the suite built): `up2` has
one more migration for every service; `up3` adds one to Nexus that fails. Bump to up2: every service's
Job runs from up2 before its Deployment rolls, and status records the new migration. Bump to up3: Nexus's
Job fails, nothing of Nexus rolls, the condition says why (the Job's reason and its log's end, read through
pods/log) and the old pods answer. Back to up2: the stack is Ready again. A task started before the
first bump, waiting for its approval while every service rolls, completes on the new pods.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from singularity_stack_testing import image_variants
from singularity_stack_testing.cluster import IMAGE, TIMINGS, Cluster, wait_until
from singularity_stack_testing.stacks import NAMESPACE, OTHER_PODS, example, ready, stack_status, wait_ready

pytestmark = pytest.mark.timeout(1800)
STACK = "upgrade"
NEW_MIGRATION = "0099.e2e-upgrade"
UP2, UP3 = f"{IMAGE}-up2", f"{IMAGE}-up3"
KINDS = image_variants.KINDS
SERVICE_PODS = OTHER_PODS - 1 + 1  # Nexus, Genesis, CentralCloud and one instance


def deployment_images(cluster: Cluster) -> dict[str, str]:
    items = cluster.json("get", "deployments", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={STACK}")["items"]
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"] for d in items}


def condition(cluster: Cluster, kind: str) -> dict[str, Any]:
    return next((c for c in stack_status(cluster, STACK).get("conditions", []) if c["type"] == kind), {})


def service_pods_on(cluster: Cluster, image: str) -> bool:
    return image_variants.service_pods_on(cluster, NAMESPACE, STACK, image, SERVICE_PODS)


def secret_value(cluster: Cluster, name: str, key: str) -> str:
    return base64.b64decode(cluster.json("get", "secret", name, "-n", NAMESPACE)["data"][key]).decode()


@contextlib.contextmanager
def apis(cluster: Cluster) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Singularity instance 1's and Nexus's APIs, through their Services (opened anew after a rollout)."""
    token = secret_value(cluster, f"{STACK}-nexus-ui", "NEXUS_UI_TOKEN")
    api_token = secret_value(cluster, f"{STACK}-singularity-api", "SINGULARITY_API_TOKEN")
    with (
        cluster.service_address(NAMESPACE, f"{STACK}-singularity-1", 8000) as singularity,
        cluster.service_address(NAMESPACE, f"{STACK}-nexus", 8000) as nexus,
        httpx.Client(
            base_url=f"http://{singularity[0]}:{singularity[1]}",
            headers={"Host": f"{STACK}-singularity-1.{NAMESPACE}.svc", "Authorization": f"Bearer {api_token}"},
            timeout=10,
        ) as singularity_api,
        httpx.Client(
            base_url=f"http://{nexus[0]}:{nexus[1]}",
            headers={"Host": f"{STACK}-nexus.{NAMESPACE}.svc", "Authorization": f"Bearer {token}"},
            timeout=10,
        ) as nexus_api,
    ):
        yield singularity_api, nexus_api


def pending_approval(nexus_api: httpx.Client) -> dict | None:
    approvals = nexus_api.get("/api/pending").json()["approvals"]
    return next((a for a in approvals if a["instance"] == "singularity_1"), None)


@pytest.fixture(scope="module")
def variants(operator_installed: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    if not shutil.which("buildah"):
        pytest.fail("buildah is missing: scripts/build-images.sh installs it")
    tmp = tmp_path_factory.mktemp("variants")
    create = "CREATE TABLE e2e_upgrade (id int PRIMARY KEY);\n"
    up2 = image_variants.build_variant(tmp, IMAGE, UP2, {f"{kind}/{NEW_MIGRATION}.sql": create for kind in KINDS})
    broken = {"nexus/0100.e2e-broken.sql": "SELECT no_such_column FROM pg_class;\n"}
    up3 = image_variants.build_variant(tmp, UP2, UP3, broken)
    assert {f"docker.io/library/{UP2}", f"docker.io/library/{UP3}"} <= image_variants.import_images(up2, up3)
    return operator_installed


def test_a_bump_runs_the_new_image_s_migrations_in_jobs_before_the_rollout(variants: Cluster) -> None:
    cluster = variants
    cluster.apply(example(STACK, replicas=1, deletion_policy="Delete"))
    wait_ready(cluster, STACK, OTHER_PODS + 1)
    before = stack_status(cluster, STACK)["services"]
    assert {s["image"] for s in before.values()} == {IMAGE}
    assert NEW_MIGRATION not in {s.get("lastMigration") for s in before.values()}
    with apis(cluster) as (singularity_api, nexus_api):  # a task in flight across the whole rollout
        created = singularity_api.post("/tasks", json={"description": "Write a program that prints a greeting"})
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]
        card = wait_until("the task's approval card", lambda: pending_approval(nexus_api), 300)

    started = time.monotonic()
    cluster.kubectl("patch", "singularitystack", STACK, "-n", NAMESPACE, "--type=merge",
                    "-p", json.dumps({"spec": {"image": UP2}}))  # fmt: skip
    gated = []

    def jobs_gate() -> bool:
        """While a service's Job has not succeeded, its Deployment still runs the old image."""
        images = deployment_images(cluster)  # first: a Job not done after this was not done before it either
        jobs = cluster.json("get", "jobs", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={STACK}")["items"]
        for job in jobs:
            component = job["metadata"]["labels"]["app.kubernetes.io/component"].removesuffix("-migration")
            if not (job.get("status") or {}).get("succeeded"):
                assert images[f"{STACK}-{component}"] == IMAGE, (job["metadata"]["name"], images)
                gated.append(component)
        return len(jobs) == len(KINDS)

    wait_until("a migration Job per service", jobs_gate, 300, interval=0.5)
    wait_until("every service Pod on up2", lambda: service_pods_on(cluster, UP2), 600)
    TIMINGS["upgrade: image bump -> all pods on the new image"] = time.monotonic() - started
    wait_until("Ready on up2", lambda: ready(cluster, STACK), 300)
    services = stack_status(cluster, STACK)["services"]
    assert services == {
        logical: {"image": UP2, "lastMigration": NEW_MIGRATION}
        for logical in ("centralcloud", "genesis", "nexus", "singularity_1")
    }
    assert gated, "no Job was seen running before its Deployment rolled"
    # each Job's successful Pod wrote its outcome as its termination message (an attempt that found
    # PostgreSQL not answering under load fails and is retried by the Job: that one is left out)
    pods = cluster.json("get", "pods", "-n", NAMESPACE, "-l", "job-name")["items"]
    ends = [p["status"]["containerStatuses"][0]["state"]["terminated"] for p in pods
            if p["metadata"]["labels"].get("app.kubernetes.io/instance") == STACK]  # fmt: skip
    messages = [end.get("message", "").strip() for end in ends if end.get("exitCode") == 0]
    assert messages == [f"last applied {NEW_MIGRATION}"] * len(KINDS), ends

    # The task started on the old image, its approval still pending, completes on the new pods.
    with apis(cluster) as (singularity_api, nexus_api):
        assert (pending_approval(nexus_api) or {}).get("request_id") == card["request_id"]
        approved = nexus_api.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""})
        assert approved.status_code == 200, approved.text

        def finished() -> dict | None:
            task = singularity_api.get(f"/tasks/{task_id}").json()
            return task if task["state"] in ("succeeded", "failed") else None

        task = wait_until("the task started before the upgrade to finish", finished, 300)
    assert task["state"] == "succeeded", task.get("failure_reason")
    assert len(task["steps"]) == 7  # nothing asked twice across the rollout


def test_a_failing_migration_rolls_nothing_and_says_why_while_the_old_pods_answer(variants: Cluster) -> None:
    cluster = variants
    cluster.kubectl("patch", "singularitystack", STACK, "-n", NAMESPACE, "--type=merge",
                    "-p", json.dumps({"spec": {"nexus": {"image": UP3}}}))  # fmt: skip

    def failed_condition() -> dict[str, Any] | None:
        found = condition(cluster, "MigrationsSucceeded")
        return found if found.get("status") == "False" else None

    failed = wait_until("MigrationsSucceeded=False", failed_condition, 600)
    assert failed["reason"] == "MigrationFailed"
    message = failed["message"]
    assert message.startswith(f"nexus: migration Job {STACK}-nexus-migrate-") and f"from image {UP3} failed" in message
    assert "BackoffLimitExceeded" in message and "no_such_column" in message, message
    assert "log tail: " in message and "error: migrating nexus" in message.split("log tail: ", 1)[1], message
    events = cluster.json("get", "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={STACK}")
    assert any(e["reason"] == "MigrationFailed" and e["type"] == "Warning" for e in events["items"])
    assert deployment_images(cluster)[f"{STACK}-nexus"] == UP2  # nothing rolled
    assert service_pods_on(cluster, UP2)
    with cluster.service_address(NAMESPACE, f"{STACK}-nexus", 8000) as (host, port):
        answer = httpx.get(f"http://{host}:{port}/readyz", headers={"Host": f"{STACK}-nexus"}, timeout=10)
        assert answer.status_code == 200, answer.text  # the old pod still serves

    # Fixed (here: back to the image that works): Ready again, nothing left waiting.
    cluster.kubectl("patch", "singularitystack", STACK, "-n", NAMESPACE, "--type=json",
                    "-p", json.dumps([{"op": "remove", "path": "/spec/nexus/image"}]))  # fmt: skip
    wait_until("Ready again", lambda: ready(cluster, STACK) and service_pods_on(cluster, UP2), 300)
    assert condition(cluster, "MigrationsSucceeded")["status"] == "True"

    def migration_jobs() -> dict[str, str]:
        found = cluster.json("get", "jobs", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={STACK}")["items"]
        return {j["metadata"]["name"]: j["metadata"]["annotations"]["singularity.dev/image"] for j in found}

    # up3's failed Job goes with its Pods once Nexus runs the image it asks for; each service keeps up2's
    wait_until("up3's Job to go", lambda: UP3 not in migration_jobs().values(), 120)
    assert sorted(migration_jobs().values()) == [UP2] * len(KINDS)
    cluster.kubectl("delete", "singularitystack", STACK, "-n", NAMESPACE, "--wait=true", "--timeout=5m")

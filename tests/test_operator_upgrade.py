"""Image bumps on a real API server and real PostgreSQL: the new image's migration Job gates the rollout.

No Job controller and no kubelet run here, so the tests play their part at this edge, through the API: the
migration itself is what the Job's container runs (`singularity-stack migrate`, in-process, from a package
with one more migration), and the Job's and its Pod's status are then patched as the Job controller and
the kubelet would write them. The Pod-reading path with a real log is tested on the local node (e2e).
"""

# ruff: noqa: F811  (the fixtures imported from test_operator_kube are the tests' parameters)
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from test_operator_kube import (  # the same control plane, chart and in-process operator  # noqa: F401
    Stacks,
    cluster,
    describe,
    external,
    namespace,
    operator,
    wait_for,
    writes_while_reconciling,
)

from singularity_operator import migration_jobs as mj
from singularity_stack import cli
from singularity_stack.provision import migrations


def roll_out(stacks: Stacks, name: str, only: str | None = None) -> None:
    """What the Deployment controller and kubelet would report once the pods of the current spec serve."""
    for deployment in stacks.deployments(name).values():
        if only and deployment.metadata.name != only:
            continue
        status = {"observedGeneration": deployment.metadata.generation, "replicas": 1, "readyReplicas": 1,
                  "availableReplicas": 1, "updatedReplicas": 1}  # fmt: skip
        stacks.apps.patch_namespaced_deployment_status(deployment.metadata.name, stacks.namespace, {"status": status})


def images(stacks: Stacks, name: str) -> dict[str, str]:
    return {d: v.spec.template.spec.containers[0].image for d, v in stacks.deployments(name).items()}


def job(stacks: Stacks, name: str) -> Any:
    return wait_for(f"Job {name}", lambda: _job(stacks, name))


def _job(stacks: Stacks, name: str) -> Any:
    found = client.BatchV1Api(stacks.apps.api_client).list_namespaced_job(stacks.namespace).items
    return next((j for j in found if j.metadata.name == name), None)


def finish_job(stacks: Stacks, name: str, ok: bool, termination: str = "") -> None:
    """The Job controller's and kubelet's part: the Job's Pod terminated, the Job Complete or Failed."""
    batch = client.BatchV1Api(stacks.apps.api_client)
    if not ok:
        found = _job(stacks, name)
        pod = {
            "metadata": {"name": f"{name}-x1", "labels": {"job-name": name}},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "containers": [{"name": "migrate", "image": found.spec.template.spec.containers[0].image}]},
        }  # fmt: skip
        stacks.core.create_namespaced_pod(stacks.namespace, pod)
        terminated = {"exitCode": 2, "reason": "Error", "message": termination}
        status = {"phase": "Failed", "containerStatuses": [{"name": "migrate", "ready": False, "restartCount": 0,
                  "image": "x", "imageID": "", "state": {"terminated": terminated}}]}  # fmt: skip
        stacks.core.patch_namespaced_pod_status(f"{name}-x1", stacks.namespace, {"status": status})
    condition = (
        {"type": "Complete", "status": "True"}
        if ok
        else {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
              "message": "Job has reached the specified backoff limit"}
    )  # fmt: skip
    status = {"conditions": [condition], **({"succeeded": 1} if ok else {"failed": 2})}
    batch.patch_namespaced_job_status(name, stacks.namespace, {"status": status})


@pytest.fixture
def newer_package(tmp_path: Path) -> Path:
    """The migrations of a newer image: the packaged ones and one more for every service."""
    root = tmp_path / "migrations"
    shutil.copytree(migrations.MIGRATIONS_ROOT, root)
    for kind in ("nexus", "genesis", "centralcloud", "singularity"):
        (root / kind / "0099.newer-image.sql").write_text("CREATE TABLE newer_image (id int PRIMARY KEY);\n")
    return root


def run_migrate(monkeypatch: pytest.MonkeyPatch, package: Path, kind: str, url: str, log: Path) -> int:
    """What the Job's container runs, from the newer image's package."""
    with monkeypatch.context() as patched:
        patched.setattr(migrations, "MIGRATIONS_ROOT", package)
        return cli.main(["migrate", kind, "--database-url", url, "--termination-log", str(log)])


def ready_stack(stacks: Stacks, name: str, spec: dict[str, Any]) -> None:
    stacks.create(name, spec)
    stacks.wait_condition(name, "DatabasesReady", "True")
    wait_for("the Deployments", lambda: len(stacks.deployments(name)) >= 4)
    assert set(stacks.run_init_containers(name).values()) == {0}  # each pod's first step: its image's migrations
    roll_out(stacks, name)
    stacks.wait_condition(name, "Ready", "True")


def test_an_image_bump_migrates_in_a_job_from_the_new_image_before_the_deployment_rolls(
    cluster, operator, namespace, pg_cluster, newer_package, tmp_path, monkeypatch
):
    plane, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    with operator():
        ready_stack(stacks, "up", external(pg_cluster, image="stack:1"))
        last = migrations.available_migrations("nexus")[-1]
        assert stacks.get("up")["status"]["services"]["nexus"] == {"image": "stack:1", "lastMigration": last}

        stacks.patch_spec("up", {"nexus": {"image": "stack:2"}})
        name = mj.job_name("up", "nexus", "stack:2")
        found = job(stacks, name)
        [container] = found.spec.template.spec.containers
        assert container.image == "stack:2" and container.args[:2] == ["migrate", "nexus"]
        assert [(e.name, e.value_from.secret_key_ref.name) for e in container.env] == [("DATABASE_URL", "up-nexus-db")]
        assert found.metadata.owner_references[0].kind == "SingularityStack"
        stacks.wait_event("up", "MigrationStarted", name)
        migrating = stacks.wait_condition("up", "MigrationsSucceeded", "Unknown")
        assert migrating["reason"] == "Migrating" and name in migrating["message"]
        # While the Job runs, the Deployment keeps the old image: no write to it at all, and no second Job.
        running = writes_while_reconciling(plane, 3)
        touched = {(w["verb"], w["objectRef"]["resource"], w["objectRef"].get("name")) for w in running}
        assert not {t for t in touched if t[1] in ("deployments", "jobs")}, describe(running)
        assert images(stacks, "up")["up-nexus"] == "stack:1"

        # The Job's container migrates the nexus database as the nexus role; then the Job succeeds.
        url = stacks.secret("up-nexus-db")["DATABASE_URL"]
        assert run_migrate(monkeypatch, newer_package, "nexus", url, tmp_path / "log") == 0
        finish_job(stacks, name, ok=True)
        wait_for("nexus on stack:2", lambda: images(stacks, "up")["up-nexus"] == "stack:2")
        assert images(stacks, "up") == {"up-centralcloud": "stack:1", "up-genesis": "stack:1",
                                        "up-nexus": "stack:2", "up-singularity-1": "stack:1"}  # fmt: skip
        strategy = stacks.deployments("up")["up-nexus"].spec.strategy
        assert strategy.type == "RollingUpdate" and strategy.rolling_update.max_unavailable == 0
        stacks.wait_condition("up", "MigrationsSucceeded", "True")
        services = stacks.get("up")["status"]["services"]
        assert services["nexus"] == {"image": "stack:2", "lastMigration": "0099.newer-image"}
        assert services["genesis"]["image"] == "stack:1"
        roll_out(stacks, "up")
        stacks.wait_condition("up", "Ready", "True")
        # Finished: the Job is not made again and idle reconciles write nothing.
        idle = writes_while_reconciling(plane, 4)
        assert idle == [], describe(idle)


def test_a_failing_migration_keeps_the_old_image_says_why_and_a_fixed_image_resumes(
    cluster, operator, namespace, pg_cluster, newer_package, tmp_path, monkeypatch
):
    plane, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    broken = tmp_path / "broken"
    shutil.copytree(migrations.MIGRATIONS_ROOT, broken)
    (broken / "genesis" / "0099.broken.sql").write_text("SELECT no_such_column FROM pg_class;\n")
    with operator():
        ready_stack(stacks, "fix", external(pg_cluster, image="stack:1"))
        stacks.patch_spec("fix", {"genesis": {"image": "stack:broken"}})
        name = mj.job_name("fix", "genesis", "stack:broken")
        job(stacks, name)
        url = stacks.secret("fix-genesis-db")["DATABASE_URL"]
        log = tmp_path / "termination-log"
        assert run_migrate(monkeypatch, broken, "genesis", url, log) == 2
        finish_job(stacks, name, ok=False, termination=log.read_text())

        failed = stacks.wait_condition("fix", "MigrationsSucceeded", "False")
        assert failed["reason"] == "MigrationFailed"
        message = failed["message"]
        assert message.startswith(f"genesis: migration Job {name} from image stack:broken failed (BackoffLimitExceeded")
        assert "exit code 2: error: migrating genesis:" in message and "no_such_column" in message, message
        event = stacks.wait_event("fix", "MigrationFailed", "no_such_column")
        assert event.type == "Warning"
        ready = stacks.wait_condition("fix", "Ready", "False")
        assert ready["reason"] == "MigrationFailed"
        assert images(stacks, "fix")["fix-genesis"] == "stack:1"  # the old pods keep serving
        assert stacks.get("fix")["status"]["services"]["genesis"]["image"] == "stack:1"
        # Reported once: the reconciles after it write nothing (no Event again, no Job again, no status).
        idle = writes_while_reconciling(plane, 4)
        assert idle == [], describe(idle)

        # A fixed image: its own Job, and once that succeeds the rollout goes on.
        stacks.patch_spec("fix", {"genesis": {"image": "stack:fixed"}})
        fixed = mj.job_name("fix", "genesis", "stack:fixed")
        job(stacks, fixed)
        assert run_migrate(monkeypatch, newer_package, "genesis", url, log) == 0
        finish_job(stacks, fixed, ok=True)
        wait_for("genesis on stack:fixed", lambda: images(stacks, "fix")["fix-genesis"] == "stack:fixed")
        stacks.wait_condition("fix", "MigrationsSucceeded", "True")
        expected = {"image": "stack:fixed", "lastMigration": "0099.newer-image"}
        wait_for("the new migration in status", lambda: stacks.get("fix")["status"]["services"]["genesis"] == expected)
        # Once genesis runs the fixed image, the failed Job of the broken one goes; the fixed one's stays.
        wait_for("the broken image's Job to go", lambda: _job(stacks, name) is None)
        assert _job(stacks, fixed) is not None
        stacks.wait_event("fix", "Deleted", f"deleted Job {name}")
        roll_out(stacks, "fix")
        stacks.wait_condition("fix", "Ready", "True")
        idle = writes_while_reconciling(plane, 4)
        assert idle == [], describe(idle)


def test_singularity_instances_roll_one_at_a_time(
    cluster, operator, namespace, pg_cluster, newer_package, tmp_path, monkeypatch
):
    plane, api_client = cluster
    stacks = Stacks(api_client, namespace)
    stacks.admin_secret(pg_cluster)
    with operator():
        ready_stack(stacks, "turns", external(pg_cluster, image="stack:1", singularity={"replicas": 3}))
        stacks.patch_spec("turns", {"singularity": {"image": "stack:2"}})
        jobs = {i: mj.job_name("turns", f"singularity_{i}", "stack:2") for i in (1, 2, 3)}
        job(stacks, jobs[1])
        waiting = stacks.wait_condition("turns", "MigrationsSucceeded", "Unknown")
        assert "singularity_2: waits for the instance before it" in waiting["message"]
        for i in (1, 2, 3):
            url = stacks.secret(f"turns-singularity-{i}-db")["DATABASE_URL"]
            # instance i's turn: only its Job exists, the instances after it have none and keep their image
            assert _job(stacks, jobs[i]) is not None
            assert all(_job(stacks, jobs[j]) is None for j in range(i + 1, 4))
            env = _job(stacks, jobs[i]).spec.template.spec.containers[0].env[0]
            assert env.value_from.secret_key_ref.name == f"turns-singularity-{i}-db"
            assert run_migrate(monkeypatch, newer_package, "singularity", url, tmp_path / "log") == 0
            finish_job(stacks, jobs[i], ok=True)
            deployment = f"turns-singularity-{i}"
            wait_for(f"instance {i} on stack:2", lambda d=deployment: images(stacks, "turns")[d] == "stack:2")
            later = [images(stacks, "turns")[f"turns-singularity-{j}"] for j in range(i + 1, 4)]
            assert later == ["stack:1"] * (3 - i)
            if i < 3:  # the next one waits while instance i is not yet available on the new image
                done = writes_while_reconciling(plane, 2)
                assert _job(stacks, jobs[i + 1]) is None, describe(done)
                roll_out(stacks, "turns", only=deployment)
                job(stacks, jobs[i + 1])
        roll_out(stacks, "turns")
        stacks.wait_condition("turns", "Ready", "True")
        services = stacks.get("turns")["status"]["services"]
        assert {services[f"singularity_{i}"]["lastMigration"] for i in (1, 2, 3)} == {"0099.newer-image"}

        # 3 → 1: the status forgets the instances that went (a merge patch drops them only when told to),
        # and then idle reconciles write nothing
        stacks.patch_spec("turns", {"singularity": {"replicas": 1}})
        expected = {"centralcloud", "genesis", "nexus", "singularity_1"}
        wait_for("two instances gone from status", lambda: set(stacks.get("turns")["status"]["services"]) == expected)
        idle = writes_while_reconciling(plane, 4)
        assert idle == [], describe(idle)

"""spec.backup and restoreFrom on a real Kubernetes API server (1.20), as the chart's ServiceAccount, with a
real PostgreSQL for the restore. No kubelet or Job controller runs here: a finished Job is simulated at that
edge only, by running the Job's own command on this machine and patching the Job's and its Pod's status
through the API with what the kubelet and the Job controller would write."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import psycopg
import pytest
from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from pydantic import ValidationError
from test_backup import fill
from test_operator_kube import _crd_established, install_chart, operator_kubeconfig, wait_for

from singularity_operator import api
from singularity_operator.backups import Backups
from singularity_operator.config import OperatorConfig
from singularity_operator.controller import ReconcileOutcome
from singularity_operator.handlers import StackHandlers
from singularity_operator.kube import Kube
from singularity_stack.provision import backup
from singularity_stack.provision import credentials as creds
from singularity_stack.provision.deprovision import drop_stack
from singularity_stack.provision.provisioner import Endpoint, Provisioner, endpoint_of
from singularity_stack.topology import StackLayout
from singularity_stack_testing.kube.apiserver import ControlPlane
from singularity_stack_testing.postgres import throwaway_cluster


@pytest.fixture(scope="module")
def plane(kube_binaries) -> Iterator[tuple[ControlPlane, client.ApiClient, Kube]]:
    """Its own API server with the chart's CRD and RBAC; the Kube client is the operator's ServiceAccount."""
    control = ControlPlane(kube_binaries).start()
    admin = config.new_client_from_config(config_file=str(control.kubeconfig))
    install_chart(admin, {}, release="ops", namespace="default")
    wait_for("the CRD", lambda: _crd_established(admin))
    operator = Kube(config.new_client_from_config(config_file=str(operator_kubeconfig(control, admin))))
    yield control, admin, operator
    control.stop()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.credentials: dict[str, creds.ServiceCredentials] = {}

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def write_credentials(self, credentials: dict[str, creds.ServiceCredentials]) -> None:
        for logical, entry in credentials.items():
            self.credentials.setdefault(logical, entry)  # create-only, as the operator's Secrets are


def owned_by(owner: dict[str, Any]) -> Any:
    def adopt(obj: dict[str, Any]) -> None:
        obj["metadata"]["ownerReferences"] = [
            {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
             "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        ]  # fmt: skip

    return adopt


def new_stack(admin: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
    body = {"apiVersion": "singularity.dev/v1alpha1", "kind": "SingularityStack", "metadata": {"name": name}}
    return client.CustomObjectsApi(admin).create_namespaced_custom_object(
        "singularity.dev", "v1alpha1", namespace, "singularitystacks", {**body, "spec": spec}
    )


def finish_job(admin: client.ApiClient, job: dict[str, Any], ok: bool, message: str, at: str) -> None:
    """What the kubelet and the Job controller would write: the Pod's termination message, the Job's condition."""
    core, batch = client.CoreV1Api(admin), client.BatchV1Api(admin)
    meta = job["metadata"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    labels = {"job-name": meta["name"], "controller-uid": meta["uid"]}  # as the Job controller labels its Pods
    pod = core.create_namespaced_pod(
        meta["namespace"],
        {
            "metadata": {"name": f"{meta['name']}-pod-{meta['uid'][:8]}", "labels": labels},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": container["name"], "image": container["image"]}],
            },
        },
    )
    terminated = {"exitCode": 0 if ok else 1, "reason": "Completed" if ok else "Error", "message": message,
                  "startedAt": at, "finishedAt": at}  # fmt: skip
    core.patch_namespaced_pod_status(
        pod.metadata.name,
        meta["namespace"],
        {"status": {"phase": "Succeeded" if ok else "Failed", "containerStatuses": [
            {"name": container["name"], "image": container["image"], "imageID": "", "ready": False, "restartCount": 0,
             "state": {"terminated": terminated}}]}},
    )  # fmt: skip
    condition = {"type": "Complete" if ok else "Failed", "status": "True", "lastProbeTime": at,
                 "lastTransitionTime": at, **({} if ok else {"reason": "BackoffLimitExceeded"})}  # fmt: skip
    status: dict[str, Any] = {"conditions": [condition], "startTime": at}
    status.update({"completionTime": at, "succeeded": 1} if ok else {"failed": 2})
    batch.patch_namespaced_job_status(meta["name"], meta["namespace"], {"status": status})


def job_from_cron_job(admin: client.ApiClient, cron_job: dict[str, Any], name: str) -> dict[str, Any]:
    """`kubectl create job --from=cronjob/...`: the CronJob's jobTemplate as a Job of its own."""
    template = cron_job["spec"]["jobTemplate"]
    body = {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "labels": template["metadata"]["labels"]}, "spec": template["spec"]}  # fmt: skip
    return (
        DynamicClient(admin)
        .resources.get(api_version="batch/v1", kind="Job")
        .create(body=body, namespace=cron_job["metadata"]["namespace"])
        .to_dict()
    )


def test_backup_cron_job_and_claim_then_status_from_the_newest_finished_jobs(plane):
    _, admin, kube = plane
    owner = new_stack(admin, "bk-cron", "bk", {"backup": {"schedule": "*/5 * * * *", "retention": 2}})
    spec = api.parse_spec(owner["spec"])
    seen = Recorder()
    backups = Backups(kube, adopt=owned_by(owner), event=seen.event)
    assert backups.cron_job_version() == "batch/v1beta1"  # what a 1.20 API server serves
    assert backups.apply("bk", "bk-cron", spec) == {"claimName": "bk-backups"}
    cron_job = kube.get("batch/v1beta1", "CronJob", "bk-backup", "bk-cron")
    assert cron_job is not None and cron_job["spec"]["schedule"] == "*/5 * * * *"
    assert cron_job["spec"]["concurrencyPolicy"] == "Forbid"
    assert cron_job["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    pod = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["BACKUP_RETENTION"] == "2" and env["PGHOST"] == "bk-postgres.bk-cron.svc"
    assert env["BACKUP_DATABASES"] == "shared_queue centralcloud genesis nexus singularity_1"
    assert pod["containers"][0]["command"] == ["/bin/sh", "-c", backup.dump_script()]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"] == {
        "type": "RuntimeDefault"
    }
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "bk-backups"
    claim = kube.get("v1", "PersistentVolumeClaim", "bk-backups", "bk-cron")
    assert claim is not None and claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert not claim["metadata"].get("ownerReferences")  # the backups outlive the stack
    assert [e[1] for e in seen.events] == ["Created", "Created"]
    backups.apply("bk", "bk-cron", spec)
    assert [e[1] for e in seen.events] == ["Created", "Created"]  # nothing to change: nothing written

    first = job_from_cron_job(admin, cron_job, "bk-backup-manual-1")
    assert backups.apply("bk", "bk-cron", spec) == {"claimName": "bk-backups"}  # running: nothing finished yet
    report = {"backup": "20261201T020000Z", "completedAt": "2026-12-01T02:00:07Z", "sizeBytes": 123456,
              "databases": 5, "removed": 0}  # fmt: skip
    finish_job(admin, first, True, json.dumps(report), "2026-12-01T02:00:07Z")
    assert backups.apply("bk", "bk-cron", spec) == {
        "claimName": "bk-backups", "job": "bk-backup-manual-1", "lastBackupSucceeded": True,
        "lastBackup": "20261201T020000Z", "completedAt": "2026-12-01T02:00:07Z", "sizeBytes": 123456,
    }  # fmt: skip
    failed = job_from_cron_job(admin, cron_job, "bk-backup-manual-2")
    finish_job(admin, failed, False, "backup failed: pg_dump of nexus: see the lines above", "2026-12-02T02:00:09Z")
    status = backups.apply("bk", "bk-cron", spec)
    assert status["lastBackupSucceeded"] is False and status["job"] == "bk-backup-manual-2"
    # the Job's reason and what its container said (no kubelet here: no log to add)
    assert status["message"] == (
        "backup Job bk-backup-manual-2 failed (BackoffLimitExceeded); "
        "backup failed: pg_dump of nexus: see the lines above"
    )
    assert status["lastBackup"] == "20261201T020000Z" and status["sizeBytes"] == 123456  # the last good one
    # a Warning Event for it, once: the handler then writes status.backup, and later passes find it shown
    assert seen.events[-1] == ("Warning", "BackupFailed", status["message"])
    write_backup_status(admin, "bk-cron", "bk", status)
    assert backups.apply("bk", "bk-cron", spec) == status
    assert [e[1] for e in seen.events].count("BackupFailed") == 1
    # the next failed Job is a failure of its own: one Event more
    again = job_from_cron_job(admin, cron_job, "bk-backup-manual-3")
    finish_job(admin, again, False, "backup failed: no space left on device", "2026-12-03T02:00:09Z")
    assert backups.apply("bk", "bk-cron", spec)["job"] == "bk-backup-manual-3"
    assert [e[2] for e in seen.events if e[1] == "BackupFailed"][1].endswith("no space left on device")


def write_backup_status(admin: client.ApiClient, namespace: str, name: str, backup_status: dict[str, Any]) -> None:
    """What the operator's handler writes after the pass: status.backup as the step returned it."""
    client.CustomObjectsApi(admin).patch_namespaced_custom_object_status(
        "singularity.dev", "v1alpha1", namespace, "singularitystacks", name, {"status": {"backup": backup_status}}
    )


def test_removing_spec_backup_removes_the_cron_job_keeps_the_claim_and_clears_status_backup(plane, tmp_path):
    control, admin, kube = plane
    owner = new_stack(admin, "bk-stop", "bk", {"backup": {"schedule": "@daily"}})
    seen = Recorder()
    backups = Backups(kube, adopt=owned_by(owner), event=seen.event)
    backed = backups.reconcile("bk", "bk-stop", api.parse_spec(owner["spec"]), "", Endpoint("x", 1), dict, dict)
    assert backed.status == {"backup": {"claimName": "bk-backups"}}
    cron_job = kube.get("batch/v1beta1", "CronJob", "bk-backup", "bk-stop")
    assert cron_job is not None
    job_from_cron_job(admin, cron_job, "bk-backup-manual")

    # The handler as the operator runs it writes what the pass returned: status.backup shown.
    handlers = StackHandlers(OperatorConfig(kubeconfig=operator_kubeconfig(control, admin)))
    outcome = ReconcileOutcome([], backed.status)
    handlers._write_status(kopf.Body(stack_body(admin, "bk-stop", "bk")), outcome)
    assert stack_body(admin, "bk-stop", "bk")["status"]["backup"] == {"claimName": "bk-backups"}

    client.CustomObjectsApi(admin).patch_namespaced_custom_object(
        "singularity.dev", "v1alpha1", "bk-stop", "singularitystacks", "bk", {"spec": {"backup": None}}
    )
    spec = api.parse_spec(stack_body(admin, "bk-stop", "bk")["spec"])
    assert spec.backup is None
    stopped = backups.reconcile("bk", "bk-stop", spec, "", Endpoint("x", 1), dict, dict)
    assert stopped.status == {"backup": None}
    assert kube.get("batch/v1beta1", "CronJob", "bk-backup", "bk-stop") is None
    assert kube.get("v1", "PersistentVolumeClaim", "bk-backups", "bk-stop") is not None  # the backups stay
    assert seen.events[-1] == (
        "Normal", "BackupsStopped",
        "spec.backup removed: deleted CronJob bk-backup; the backups on claim bk-backups are kept "
        "(delete the claim to drop them)",
    )  # fmt: skip
    # the handler sends status.backup as null: the merge patch deletes it
    handlers._write_status(kopf.Body(stack_body(admin, "bk-stop", "bk")), ReconcileOutcome([], stopped.status))
    assert "backup" not in stack_body(admin, "bk-stop", "bk")["status"]
    # and again: nothing to delete, nothing said, nothing to write
    events = len(seen.events)
    assert backups.reconcile("bk", "bk-stop", spec, "", Endpoint("x", 1), dict, dict).status == {"backup": None}
    assert len(seen.events) == events
    before = stack_body(admin, "bk-stop", "bk")["metadata"]["resourceVersion"]
    handlers._write_status(kopf.Body(stack_body(admin, "bk-stop", "bk")), ReconcileOutcome([], stopped.status))
    assert stack_body(admin, "bk-stop", "bk")["metadata"]["resourceVersion"] == before


def stack_body(admin: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return client.CustomObjectsApi(admin).get_namespaced_custom_object(
        "singularity.dev", "v1alpha1", namespace, "singularitystacks", name
    )


@pytest.fixture
def fresh_postgres() -> Iterator[str]:
    cluster = throwaway_cluster()
    cluster.start()
    try:
        yield cluster.dsn()
    finally:
        cluster.stop("immediate")
        shutil.rmtree(cluster.datadir, ignore_errors=True)


def test_restore_from_holds_provisioning_until_its_job_restored_then_the_roles_get_passwords(
    plane, fresh_postgres, open_tmp: Path
):
    _, admin, kube = plane
    dsn = fresh_postgres
    # the old stack (a managed server's names: no prefix), its backup on "its claim" (a directory here), then gone
    old = Provisioner(dsn, StackLayout(2), report=lambda _: None).run()  # two instances; the new stack asks one
    ids = fill(old)
    tools = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip() or "/usr/bin")
    env = {**backup.libpq_environment(dsn), **backup.dump_environment(old.layout, str(open_tmp), 3)}
    taken = backup.run_script(backup.dump_script(), env, tools).report["backup"]
    drop_stack(dsn, old.layout)

    owner = new_stack(
        admin, "bk-restore", "new", {"postgres": {"managed": {"restoreFrom": {"claimName": "old-backups"}}}}
    )
    spec = api.parse_spec(owner["spec"])
    seen = Recorder()
    backups = Backups(kube, adopt=owned_by(owner), event=seen.event)
    public = endpoint_of(dsn)

    def step() -> Any:
        return backups.reconcile(
            "new", "bk-restore", spec, dsn, public, lambda layout: creds.known_passwords(seen.credentials),
            seen.write_credentials,
        )  # fmt: skip

    assert step().waiting == ("Restoring", "restoring backup latest from claim old-backups")
    job = kube.get("batch/v1", "Job", "new-restore", "bk-restore")
    assert job is not None and job["metadata"]["ownerReferences"][0]["name"] == "new"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["volumeMounts"][0]["readOnly"] is True
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "old-backups"
    assert step().waiting == ("Restoring", "restoring backup latest from claim old-backups")  # still running
    assert seen.credentials == {}  # nothing provisioned meanwhile

    # the Job's Pod, here: its own command and environment, the claim's directory, libpq pointed at this server
    job_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    run_env = {**os.environ, **job_env, **backup.libpq_environment(dsn), "BACKUP_ROOT": str(open_tmp)}
    run_env["RESTORE_REPORT"] = ""
    run_env["PATH"] = f"{tools}:{run_env['PATH']}"
    done = subprocess.run(container["command"], env=run_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    finish_job(admin, job, True, done.stdout, "2026-12-01T03:00:00Z")

    finished = step()
    assert finished.waiting is None and finished.status == {"backup": {"restored": taken}}
    assert ("Normal", "Restored", f"restored backup {taken}; its 6 roles got passwords") in seen.events
    assert backup.passwordless_roles(dsn, old.layout) == []
    assert "singularity_2" in seen.credentials  # kept for a scale to two: its role has a known password
    # provisioning as the operator does, from the Secrets just written: nothing refused, the old task is there
    result = Provisioner(
        dsn, StackLayout(1), known_passwords=creds.known_passwords(seen.credentials), owner="bk-restore/new",
        public_endpoint=public, report=lambda _: None,
    ).run()  # fmt: skip
    assert not any("created role" in c or "created database" in c for c in result.changes)
    with psycopg.connect(result.credentials["singularity_1"].database_url) as conn:
        assert conn.execute("SELECT state FROM tasks WHERE id = %s", (ids["task"],)).fetchone() == ("succeeded",)
    events = len(seen.events)
    assert step().status == {"backup": {"restored": taken}} and len(seen.events) == events  # idle: nothing new

    # a stack whose server has its databases already is never restored over: no Job
    other = Backups(kube, adopt=owned_by(owner), event=seen.event)
    step_other = other.restore("other", "bk-restore", spec, dsn, Endpoint("x", 1), lambda _: {}, seen.write_credentials)
    assert step_other.waiting is None and kube.get("batch/v1", "Job", "other-restore", "bk-restore") is None


def test_a_failed_restore_job_says_why_and_holds_provisioning(plane, fresh_postgres):
    _, admin, kube = plane
    owner = new_stack(admin, "bk-fail", "gone", {"postgres": {"managed": {"restoreFrom": {
        "claimName": "c", "backup": "20200101T000000Z"}}}})  # fmt: skip
    spec = api.parse_spec(owner["spec"])
    seen = Recorder()
    at = datetime(2026, 12, 1, 3, 0, 10, tzinfo=UTC)  # before the first retry is due
    backups = Backups(kube, adopt=owned_by(owner), event=seen.event, now=lambda: at)
    args = ("gone", "bk-fail", spec, fresh_postgres, endpoint_of(fresh_postgres), lambda _: {}, seen.write_credentials)
    assert backups.restore(*args).waiting == ("Restoring", "restoring backup 20200101T000000Z from claim c")
    job = kube.get("batch/v1", "Job", "gone-restore", "bk-fail")
    assert job is not None
    message = (
        "restore failed: backup 20200101T000000Z is missing or incomplete (no globals.sql in /backups/20200101T000000Z)"
    )
    finish_job(admin, job, False, message, "2026-12-01T03:00:00Z")
    reason, why = backups.restore(*args).waiting or ("", "")
    assert reason == "RestoreFailed" and why == (
        f"restore Job gone-restore failed (attempt 1): {message}; retrying at 2026-12-01T03:01:00Z "
        "(change restoreFrom to retry another backup now)"
    )
    assert seen.credentials == {}


def test_a_failed_restore_is_retried_with_backoff_or_at_once_for_another_backup(plane, fresh_postgres):
    """No `kubectl delete job`: the same restore again 1, 2, 4 ... minutes after each failure; another one
    (restoreFrom changed) at once. Each attempt is a Job of its own, each failure one Warning Event."""
    _, admin, kube = plane
    source = {"claimName": "c", "backup": "20200101T000000Z"}
    owner = new_stack(admin, "bk-retry", "again", {"postgres": {"managed": {"restoreFrom": source}}})
    spec = api.parse_spec(owner["spec"])
    seen, clock = Recorder(), [datetime(2026, 12, 1, 3, 0, 30, tzinfo=UTC)]
    backups = Backups(kube, adopt=owned_by(owner), event=seen.event, now=lambda: clock[0])

    def restore(at: api.StackSpec = spec) -> tuple[str, str]:
        step = backups.restore("again", "bk-retry", at, fresh_postgres, endpoint_of(fresh_postgres), dict, dict)
        assert step.waiting is not None
        return step.waiting

    def the_job() -> dict[str, Any]:
        found = kube.get("batch/v1", "Job", "again-restore", "bk-retry")
        assert found is not None
        return found

    assert restore()[0] == "Restoring"
    first = the_job()
    assert first["metadata"]["annotations"] == {
        "singularity.dev/restore-from": "c/20200101T000000Z", "singularity.dev/restore-attempt": "1"
    }  # fmt: skip
    finish_job(admin, first, False, "restore failed: the claim is not there yet", "2026-12-01T03:00:00Z")
    reason, why = restore()
    assert reason == "RestoreFailed" and "(attempt 1): restore failed: the claim is not there yet" in why
    assert "retrying at 2026-12-01T03:01:00Z" in why and seen.events[-1] == ("Warning", "RestoreFailed", why)
    assert the_job()["metadata"]["uid"] == first["metadata"]["uid"]  # before its time: left alone

    clock[0] = datetime(2026, 12, 1, 3, 1, 0, tzinfo=UTC)  # the retry's time: a new Job, the second attempt
    assert restore()[0] == "Restoring"
    second = wait_for("the second attempt's Job", lambda: (j := the_job())["metadata"]["uid"] != first["metadata"][
        "uid"] and j)  # fmt: skip
    assert second["metadata"]["annotations"]["singularity.dev/restore-attempt"] == "2"
    assert seen.events[-1] == ("Normal", "RestoreStarted", "restoring backup 20200101T000000Z from claim c (attempt 2)")
    assert restore()[0] == "Restoring"  # running: the first attempt's Pod says nothing about it
    finish_job(admin, second, False, "restore failed: still not there", "2026-12-01T03:01:30Z")
    reason, why = restore()
    assert "(attempt 2): restore failed: still not there" in why and "retrying at 2026-12-01T03:03:30Z" in why

    # another backup asked for: the failed Job goes at once, and the new request's first attempt runs
    other = api.parse_spec({"postgres": {"managed": {"restoreFrom": {**source, "backup": "20200102T000000Z"}}}})
    assert restore(other) == ("Restoring", "restoring backup 20200102T000000Z from claim c")
    third = wait_for("the new request's Job", lambda: (j := the_job())["metadata"]["uid"] != second["metadata"][
        "uid"] and j)  # fmt: skip
    assert third["metadata"]["annotations"] == {
        "singularity.dev/restore-from": "c/20200102T000000Z", "singularity.dev/restore-attempt": "1"
    }  # fmt: skip
    env = {e["name"]: e.get("value") for e in third["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RESTORE_BACKUP"] == "20200102T000000Z"
    assert [e[1] for e in seen.events].count("RestoreFailed") == 2


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"postgres": {"external": {"host": "db", "adminSecret": {"name": "a"}}}, "backup": {}},
         "backup: only for managed PostgreSQL; with external, use the provider's backups"),
        ({"postgres": {"managed": {"restoreFrom": {"claimName": "c", "backup": "../../etc"}}}}, "String should match"),
        ({"postgres": {"managed": {"restoreFrom": {"claimName": "../c"}}}}, "String should match"),
        ({"backup": {"retention": 0}}, "greater than or equal to 1"),
        ({"backup": {"schedule": "every day"}}, "String should match"),
    ],
)  # fmt: skip
def test_a_bad_backup_or_restore_spec_is_refused_naming_the_field(spec, says):
    with pytest.raises(ValidationError, match=re.escape(says)):
        api.parse_spec(spec)

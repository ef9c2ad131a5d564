"""Pure functions for a stack's backups: the claim, the CronJob, the restore Job, and reading the status
of finished Jobs. No API calls here.

The CronJob and the restore Job run the scripts of `singularity_stack.provision.backup` (the ones the
tests run against real PostgreSQL) from the stack's PostgreSQL image, which has the client tools. The
claim the operator creates for backups carries no owner reference: it outlives the stack, whatever its
deletion policy, so a new stack can be restored from it (delete it yourself when the backups may go).
"""

from __future__ import annotations

import json
from typing import Any

from singularity_operator import api, objects
from singularity_stack.provision import backup
from singularity_stack.topology import StackLayout

Manifest = dict[str, Any]
BACKUP_MOUNT = "/backups"
POSTGRES_UID = 999  # the PostgreSQL image's postgres account
# batch/v1 serves CronJob from Kubernetes 1.21; 1.20 (the local node) serves batch/v1beta1 only.
CRON_JOB_VERSIONS = ("batch/v1", "batch/v1beta1")
COMPONENT = "backup"
RESTORE_COMPONENT = "restore"
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 600
MESSAGE_CHARS = 1000
RESTORE_REQUEST_ANNOTATION = f"{api.GROUP}/restore-from"
RESTORE_ATTEMPT_ANNOTATION = f"{api.GROUP}/restore-attempt"
RESTORE_RETRY_FIRST_SECONDS = 60
RESTORE_RETRY_MAX_SECONDS = 1800


def backup_claim_name(stack: str) -> str:
    return f"{stack}-backups"


def cron_job_name(stack: str) -> str:
    return f"{stack}-backup"


def restore_job_name(stack: str) -> str:
    return f"{stack}-restore"


def claim_of(stack: str, spec: api.BackupSpec) -> str:
    return spec.volume.claim_name or backup_claim_name(stack)


def backup_claim(stack: str, namespace: str, spec: api.BackupSpec) -> Manifest | None:
    """The claim the operator creates, when spec.backup names none."""
    if spec.volume.claim_name:
        return None
    claim: Manifest = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": backup_claim_name(stack),
            "namespace": namespace,
            "labels": objects.labels(stack, COMPONENT),
        },
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": spec.volume.size}}},
    }
    if spec.volume.storage_class_name:
        claim["spec"]["storageClassName"] = spec.volume.storage_class_name
    return claim


def _pod(
    stack: str, namespace: str, spec: api.StackSpec, component: str, script: str, env: dict[str, str], claim: str
) -> Manifest:
    """A run-once Pod of the PostgreSQL image: non-root, nothing to escalate, its report as termination message."""
    assert spec.postgres.managed is not None
    libpq = [
        {"name": "PGHOST", "value": f"{objects.postgres_name(stack)}.{namespace}.svc"},  # as the services name it
        {"name": "PGPORT", "value": str(objects.POSTGRES_PORT)},
        {"name": "PGUSER", "value": "postgres"},
        {"name": "PGDATABASE", "value": "postgres"},
        {
            "name": "PGPASSWORD",
            "valueFrom": {"secretKeyRef": {"name": objects.admin_secret_name(stack), "key": "POSTGRES_PASSWORD"}},
        },
    ]
    container = {
        "name": component,
        "image": spec.postgres.managed.image,
        "command": ["/bin/sh", "-c", script],
        # an empty value is left out: the API server drops it, and the CronJob would differ on every reconcile
        "env": [*libpq, *({"name": k, "value": v} for k, v in env.items() if v)],
        "volumeMounts": [{"name": "backups", "mountPath": BACKUP_MOUNT}],
        "terminationMessagePath": backup.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
        },
    }
    return {
        "metadata": {"labels": objects.labels(stack, component)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": POSTGRES_UID,
                "runAsGroup": POSTGRES_UID,
                "fsGroup": POSTGRES_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [{"name": "backups", "persistentVolumeClaim": {"claimName": claim}}],
        },
    }


def backup_cron_job(stack: str, namespace: str, spec: api.StackSpec, api_version: str = "batch/v1beta1") -> Manifest:
    """The CronJob of spec.backup (managed PostgreSQL only): one backup at a time, its Jobs' history kept."""
    assert spec.backup is not None and api_version in CRON_JOB_VERSIONS
    layout = StackLayout(spec.singularity.replicas)  # a managed server's names carry no prefix
    env = backup.dump_environment(layout, BACKUP_MOUNT, spec.backup.retention, backup.TERMINATION_LOG)
    pod = _pod(stack, namespace, spec, COMPONENT, backup.dump_script(), env, claim_of(stack, spec.backup))
    return {
        "apiVersion": api_version,
        "kind": "CronJob",
        "metadata": {"name": cron_job_name(stack), "namespace": namespace, "labels": objects.labels(stack, COMPONENT)},
        "spec": {
            "schedule": spec.backup.schedule,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": objects.labels(stack, COMPONENT)},
                "spec": {"backoffLimit": 1, "template": pod},
            },
        },
    }


def restore_request(source: api.RestoreFrom) -> str:
    """What a restore Job restores, as its annotation records it: a Job of another request is never retried."""
    return f"{source.claim_name}/{source.backup}"


def restore_attempt(job: Manifest) -> int:
    value = str((job["metadata"].get("annotations") or {}).get(RESTORE_ATTEMPT_ANNOTATION, "1"))
    return int(value) if value.isdigit() and 0 < int(value) < 1_000_000 else 1


def restore_retry_delay(attempt: int) -> int:
    """Seconds after the failure of attempt `attempt` before the next: 1, 2, 4 ... minutes, then every 30."""
    return int(min(RESTORE_RETRY_FIRST_SECONDS * 2 ** min(max(attempt, 1) - 1, 20), RESTORE_RETRY_MAX_SECONDS))


def failed_at(job: Manifest) -> str:
    """When a Job failed (its Failed condition's transition), else when it started or was made."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("lastTransitionTime"):
            return str(condition["lastTransitionTime"])
    return str((job.get("status") or {}).get("startTime") or job["metadata"].get("creationTimestamp") or "")


def restore_job(stack: str, namespace: str, spec: api.StackSpec, attempt: int = 1) -> Manifest:
    """The Job of spec.postgres.managed.restoreFrom: restores the backup into the stack's fresh server."""
    assert spec.postgres.managed is not None and spec.postgres.managed.restore_from is not None
    source = spec.postgres.managed.restore_from
    env = {"BACKUP_ROOT": BACKUP_MOUNT, "RESTORE_BACKUP": source.backup, "RESTORE_REPORT": backup.TERMINATION_LOG}
    pod = _pod(stack, namespace, spec, RESTORE_COMPONENT, backup.restore_script(), env, source.claim_name)
    # the backups are only read
    pod["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": restore_job_name(stack),
            "namespace": namespace,
            "labels": objects.labels(stack, RESTORE_COMPONENT),
            "annotations": {
                RESTORE_REQUEST_ANNOTATION: restore_request(source),
                RESTORE_ATTEMPT_ANNOTATION: str(attempt),
            },
        },
        # PostgreSQL may still be starting: the script changes nothing before it connects, so a retry is safe
        # until then; a restore that failed half-way fails again ("the server already has ...") and says so.
        "spec": {"backoffLimit": 4, "template": pod},
    }


# -- reading finished Jobs ------------------------------------------------------------------------------


def job_finished(job: dict[str, Any]) -> bool | None:
    """True: succeeded; False: failed; None: still running (or not started)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return bool(condition["type"] == "Complete")
    return None


def termination_message(pods: list[dict[str, Any]]) -> str:
    """The newest terminated container's message among a Job's Pods ("" when none says anything)."""
    messages = []
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated") or {}
            if terminated.get("message"):
                messages.append((terminated.get("finishedAt") or "", terminated["message"].strip()))
    return max(messages)[1] if messages else ""


def report_of(message: str) -> dict[str, Any]:
    """The script's JSON line, when the message is one (else {})."""
    try:
        report = json.loads(message.strip().splitlines()[-1]) if message.strip() else {}
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def _job_time(job: dict[str, Any]) -> str:
    status = job.get("status") or {}
    return str(status.get("completionTime") or status.get("startTime") or job["metadata"].get("creationTimestamp"))


def newest_finished(jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    finished = sorted((j for j in jobs if job_finished(j) is not None), key=_job_time)
    return finished[-1] if finished else None


def tail(text: str, lines: int = LOG_TAIL_LINES, chars: int = LOG_TAIL_CHARS) -> str:
    kept = "\n".join(text.strip().splitlines()[-lines:])
    return kept if len(kept) <= chars else "…" + kept[-chars:]


def failure_message(job: dict[str, Any], termination: str, log: str) -> str:
    """Why a backup Job failed, in one line: the Job's reason (BackoffLimitExceeded, DeadlineExceeded, ...),
    what its container wrote as termination message, and its log's last lines (the same text every reconcile)."""
    conditions: list[dict[str, Any]] = (job.get("status") or {}).get("conditions") or []
    failed = next((c for c in conditions if c.get("type") == "Failed"), {})
    why = ": ".join(str(part) for part in (failed.get("reason") or "Failed", failed.get("message")) if part)
    parts = [f"backup Job {job['metadata']['name']} failed ({why})"]
    if termination:
        parts.append(termination)
    if log.strip() and log.strip() != termination.strip():
        parts.append(f"log tail: {tail(log)}")
    return "; ".join(parts)[:MESSAGE_CHARS]


def backup_status(
    claim: str, jobs: list[dict[str, Any]], pods: dict[str, list[dict[str, Any]]], log: str = ""
) -> dict[str, Any]:
    """status.backup from the backup Jobs (`pods`: each Job's Pods, by Job name; `log`: the newest finished Job's
    log tail, read when it failed): whether the newest finished one succeeded (if not, why), and the newest
    successful backup's name, time and size (from its termination message)."""
    finished = sorted((j for j in jobs if job_finished(j) is not None), key=_job_time)
    status: dict[str, Any] = {"claimName": claim}
    if not finished:
        return status
    newest = finished[-1]
    status["job"] = newest["metadata"]["name"]
    status["lastBackupSucceeded"] = bool(job_finished(newest))
    if not status["lastBackupSucceeded"]:
        status["message"] = failure_message(newest, termination_message(pods.get(status["job"], [])), log)
    for job in reversed(finished):
        report = report_of(termination_message(pods.get(job["metadata"]["name"], [])))
        if job_finished(job) and backup.BACKUP_NAME.fullmatch(str(report.get("backup", ""))):
            status["lastBackup"] = report["backup"]
            status["completedAt"] = str(report.get("completedAt", _job_time(job)))
            if isinstance(report.get("sizeBytes"), int):
                status["sizeBytes"] = report["sizeBytes"]
            break
    return status

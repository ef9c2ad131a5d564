"""A stack's backups and its restore, as one reconcile step (the manifests are backup_objects.py's).

Before provisioning: `spec.postgres.managed.restoreFrom` on a fresh server creates the restore Job and
holds provisioning until it finished; once it succeeded, the restored roles (which a backup keeps without
passwords) get the passwords of the stack's credentials Secrets (written first, new ones where none
exists), so the provisioner finds every role with a known password. A server that already has the
stack's databases is never restored over.

A failed restore Job is replaced, never left for `kubectl delete job`:
- at once when restoreFrom asks for another restore than the one it ran (another claim or backup; `latest`
  and the tag it resolves to count as different, so writing the tag out retries now);
- else automatically, 1, 2, 4 ... minutes after each failure, then every 30 minutes (the Job's
  `restore-attempt` annotation counts; the condition says when the next attempt starts).
Every attempt is a Job of its own, its failure one Warning Event. A retry skips the "already has the
stack's databases" check: a half-done restore is refused by the restore script itself, saying so.

Then `spec.backup`'s claim and CronJob are applied and the newest backup Jobs read into status.backup; a
failed one is a Warning Event once (per Job) and status.backup says why (the Job's reason, termination
message and log tail). Without spec.backup the CronJob goes (its Jobs with it) and status.backup is
cleared; the backups' claim and the backups on it stay, as an Event says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

from singularity_operator import api, objects
from singularity_operator import backup_objects as bo
from singularity_operator.kube import Kube
from singularity_stack.provision import backup
from singularity_stack.provision import credentials as creds
from singularity_stack.provision.provisioner import Endpoint, Provisioner
from singularity_stack.topology import MAX_INSTANCES, StackLayout

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5
Adopt = Callable[[dict[str, Any]], None]
EventRecorder = Callable[[str, str, str], None]
WriteCredentials = Callable[[dict[str, creds.ServiceCredentials]], None]
KnownPasswords = Callable[[StackLayout], dict[str, str]]


@dataclass
class BackupStep:
    """What the step found: `waiting` (reason, message) holds provisioning back; `status` joins the stack's
    (`{"backup": None}`: status.backup goes, a merge patch deleting what it is sent as null)."""

    waiting: tuple[str, str] | None = None
    status: dict[str, Any] = field(default_factory=dict)


def _timed(dsn: str) -> str:
    return dsn + ("&" if "?" in dsn else "?") + f"connect_timeout={CONNECT_TIMEOUT}"


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


class Backups:
    def __init__(
        self, kube: Kube, *, adopt: Adopt, event: EventRecorder, now: Callable[[], datetime] | None = None
    ) -> None:
        self.kube = kube
        self.adopt = adopt
        self.event = event
        self.now = now or (lambda: datetime.now(UTC))

    def cron_job_version(self) -> str:
        """batch/v1 where the API server serves CronJob there (1.21+), else batch/v1beta1."""
        for version in bo.CRON_JOB_VERSIONS:
            try:
                self.kube.client.resources.get(api_version=version, kind="CronJob")
            except ResourceNotFoundError:
                continue
            return version
        raise RuntimeError("the API server serves no CronJob (batch/v1 nor batch/v1beta1)")

    def _pods(self, namespace: str, job: str, uid: str | None = None) -> list[dict[str, Any]]:
        """A Job's Pods; with its uid, only this Job's (not a replaced Job's of the same name, still going)."""
        return self.kube.list("v1", "Pod", namespace, f"job-name={job}" + (f",controller-uid={uid}" if uid else ""))

    def _log_tail(self, namespace: str, pods: list[dict[str, Any]]) -> str:
        """The newest Pod's log tail (pods/log, from its node); empty when the node cannot give it."""
        if not pods:
            return ""
        pod = max(pods, key=lambda p: str(p["metadata"].get("creationTimestamp") or ""))
        try:
            log = CoreV1Api(self.kube.client.client).read_namespaced_pod_log(
                pod["metadata"]["name"], namespace, tail_lines=bo.LOG_TAIL_LINES
            )
        except ApiException:
            return ""
        return log if isinstance(log, str) else ""  # None: nothing came back (no node ran the Pod)

    def _replace(self, job: dict[str, Any], manifest: dict[str, Any]) -> None:
        """The failed Job goes (its Pods after it) and the next attempt's is made under the same name."""
        meta = job["metadata"]
        self.kube.client.resources.get(api_version="batch/v1", kind="Job").delete(
            name=meta["name"], namespace=meta["namespace"], body={"propagationPolicy": "Background"}
        )
        self.adopt(manifest)
        self.kube.apply(manifest, create_only=True)

    # -- restore, before provisioning ------------------------------------------------------------------

    def restore(
        self,
        stack: str,
        namespace: str,
        spec: api.StackSpec,
        admin_dsn: str,
        public: Endpoint,
        known: KnownPasswords,
        write_credentials: WriteCredentials,
    ) -> BackupStep:
        managed = spec.postgres.managed
        if managed is None or managed.restore_from is None:
            return BackupStep()
        source = managed.restore_from
        layout = StackLayout(spec.singularity.replicas)
        name = bo.restore_job_name(stack)
        job = self.kube.get("batch/v1", "Job", name, namespace)
        if job is None:
            with psycopg.connect(_timed(admin_dsn)) as conn:  # PostgreSQL answers (else: PostgresUnreachable)
                provisioned = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (layout.shared_queue_database,)
                ).fetchone()
            if provisioned:  # the stack has its databases (restored or provisioned before): never restored over
                return BackupStep()
            manifest = bo.restore_job(stack, namespace, spec)
            self.adopt(manifest)
            self.kube.apply(manifest)
            self.event("Normal", "RestoreStarted", f"restoring backup {source.backup} from claim {source.claim_name}")
            return BackupStep(("Restoring", f"restoring backup {source.backup} from claim {source.claim_name}"))
        finished = bo.job_finished(job)
        if finished is None:
            return BackupStep(("Restoring", f"restoring backup {source.backup} from claim {source.claim_name}"))
        message = bo.termination_message(self._pods(namespace, name, job["metadata"].get("uid")))
        if not finished:
            return self._failed_restore(stack, namespace, spec, job, message)
        report = bo.report_of(message)
        restored = str(report.get("restored") or source.backup)
        # every restored instance gets its password, also those above spec's replicas (scaled to later)
        instances = report.get("instances")
        if isinstance(instances, int) and instances > layout.instances:
            layout = StackLayout(min(instances, MAX_INSTANCES))
        roles = backup.passwordless_roles(_timed(admin_dsn), layout)
        if roles:
            passwords = known(layout)
            new = {role: passwords.get(role) or creds.generate_password() for role in roles}
            planned = Provisioner(admin_dsn, layout, known_passwords={**passwords, **new}, public_endpoint=public)
            write_credentials(planned.credentials())  # kept before any role has it
            backup.set_passwords(_timed(admin_dsn), new)
            self.event("Normal", "Restored", f"restored backup {restored}; its {len(roles)} roles got passwords")
        return BackupStep(status={"restored": restored})

    def _failed_restore(
        self, stack: str, namespace: str, spec: api.StackSpec, job: dict[str, Any], message: str
    ) -> BackupStep:
        """A failed restore Job: replaced now (another request), at its retry time (the same), else reported."""
        assert spec.postgres.managed is not None and spec.postgres.managed.restore_from is not None
        source = spec.postgres.managed.restore_from
        name, attempt = job["metadata"]["name"], bo.restore_attempt(job)
        asked = (job["metadata"].get("annotations") or {}).get(bo.RESTORE_REQUEST_ANNOTATION)
        restoring = ("Restoring", f"restoring backup {source.backup} from claim {source.claim_name}")
        if asked != bo.restore_request(source):
            self._replace(job, bo.restore_job(stack, namespace, spec))
            self.event("Normal", "RestoreStarted", f"{restoring[1]} (restoreFrom changed: Job {name} replaced)")
            return BackupStep(restoring)
        failed = _parse_time(bo.failed_at(job)) or self.now()
        retry = failed + timedelta(seconds=bo.restore_retry_delay(attempt))
        if self.now() >= retry:
            self._replace(job, bo.restore_job(stack, namespace, spec, attempt + 1))
            self.event("Normal", "RestoreStarted", f"{restoring[1]} (attempt {attempt + 1})")
            return BackupStep(restoring)
        at = retry.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        why = (
            f"restore Job {name} failed (attempt {attempt}): {message or 'see its Pods'}; retrying at {at} "
            "(change restoreFrom to retry another backup now)"
        )
        self.event("Warning", "RestoreFailed", why)  # once per attempt: the condition shows it afterwards
        return BackupStep(("RestoreFailed", why[: bo.MESSAGE_CHARS]))

    # -- spec.backup ---------------------------------------------------------------------------------------

    def stop(self, stack: str, namespace: str) -> None:
        """No spec.backup (any more): its CronJob goes, with the backup Jobs it made; the claim and the backups
        on it stay (a restore may need them), and the Event says where they are."""
        version = self.cron_job_version()
        cron_job = self.kube.get(version, "CronJob", bo.cron_job_name(stack), namespace)
        labels = ((cron_job or {}).get("metadata") or {}).get("labels") or {}
        if cron_job is None or labels.get("app.kubernetes.io/managed-by") != objects.MANAGED_BY:
            return
        volumes = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"].get("volumes") or []
        claims = [v["persistentVolumeClaim"]["claimName"] for v in volumes if v.get("persistentVolumeClaim")]
        try:
            self.kube.client.resources.get(api_version=version, kind="CronJob").delete(
                name=bo.cron_job_name(stack), namespace=namespace, body={"propagationPolicy": "Background"}
            )
        except NotFoundError:
            return
        kept = f"; the backups on claim {claims[0]} are kept (delete the claim to drop them)" if claims else ""
        self.event("Normal", "BackupsStopped", f"spec.backup removed: deleted CronJob {bo.cron_job_name(stack)}{kept}")

    def _report_failure(self, stack: str, namespace: str, status: dict[str, Any]) -> None:
        """A Warning Event for a failed backup Job, once: not when the stack's status.backup already shows it."""
        body = self.kube.get(f"{api.GROUP}/{api.VERSION}", api.KIND, stack, namespace) or {}
        shown = (body.get("status") or {}).get("backup") or {}
        if shown.get("job") == status["job"] and shown.get("lastBackupSucceeded") is False:
            return
        self.event("Warning", "BackupFailed", status["message"])

    def apply(self, stack: str, namespace: str, spec: api.StackSpec) -> dict[str, Any]:
        """The claim (created once, never owned by the stack) and the CronJob; status.backup's fields."""
        if spec.postgres.managed is None:
            return {}
        if spec.backup is None:
            self.stop(stack, namespace)
            return {}
        claim = bo.backup_claim(stack, namespace, spec.backup)
        if claim is not None and self.kube.apply(claim, create_only=True) == "created":
            self.event("Normal", "Created", f"created PersistentVolumeClaim {claim['metadata']['name']} (kept)")
        cron_job = bo.backup_cron_job(stack, namespace, spec, self.cron_job_version())
        self.adopt(cron_job)
        done = self.kube.apply(cron_job)
        if done:
            self.event("Normal", done.capitalize(), f"{done} CronJob {cron_job['metadata']['name']}")
        selector = f"app.kubernetes.io/instance={stack},app.kubernetes.io/component={bo.COMPONENT}"
        jobs = self.kube.list("batch/v1", "Job", namespace, selector)
        finished = [j["metadata"]["name"] for j in jobs if bo.job_finished(j) is not None]
        pods = {job: self._pods(namespace, job) for job in finished}
        newest = bo.newest_finished(jobs)
        failed = newest is not None and bo.job_finished(newest) is False
        log = self._log_tail(namespace, pods[newest["metadata"]["name"]]) if newest is not None and failed else ""
        status = bo.backup_status(bo.claim_of(stack, spec.backup), jobs, pods, log)
        if failed:
            self._report_failure(stack, namespace, status)
        return status

    def reconcile(
        self,
        stack: str,
        namespace: str,
        spec: api.StackSpec,
        admin_dsn: str,
        public: Endpoint,
        known: KnownPasswords,
        write_credentials: WriteCredentials,
    ) -> BackupStep:
        """The restore (which may hold provisioning back), then the backups; status.backup from both."""
        step = self.restore(stack, namespace, spec, admin_dsn, public, known, write_credentials)
        if step.waiting is None:
            step.status = {**self.apply(stack, namespace, spec), **step.status}
        step.status = {"backup": step.status or None}  # None: nothing to show, and what was shown goes
        return step

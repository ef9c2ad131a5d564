"""A stack's backups and its restore, as one reconcile step (the manifests are backup_objects.py's).

Before provisioning: `spec.postgres.managed.restoreFrom` on a fresh server creates the restore Job and
holds provisioning until it finished; once it succeeded, the restored roles (which a backup keeps without
passwords) get the passwords of the stack's credentials Secrets (written first, new ones where none
exists), so the provisioner finds every role with a known password. A server that already has the
stack's databases is never restored over. Then `spec.backup`'s claim and CronJob are applied and the
newest backup Jobs read into status.backup.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from singularity_operator import api
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
    """What the step found: `waiting` (reason, message) holds provisioning back; `status` joins the stack's."""

    waiting: tuple[str, str] | None = None
    status: dict[str, Any] = field(default_factory=dict)


def _timed(dsn: str) -> str:
    return dsn + ("&" if "?" in dsn else "?") + f"connect_timeout={CONNECT_TIMEOUT}"


class Backups:
    def __init__(self, kube: Kube, *, adopt: Adopt, event: EventRecorder) -> None:
        self.kube = kube
        self.adopt = adopt
        self.event = event

    def cron_job_version(self) -> str:
        """batch/v1 where the API server serves CronJob there (1.21+), else batch/v1beta1."""
        for version in bo.CRON_JOB_VERSIONS:
            try:
                self.kube.client.resources.get(api_version=version, kind="CronJob")
            except ResourceNotFoundError:
                continue
            return version
        raise RuntimeError("the API server serves no CronJob (batch/v1 nor batch/v1beta1)")

    def _pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return self.kube.list("v1", "Pod", namespace, f"job-name={job}")

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
        message = bo.termination_message(self._pods(namespace, name))
        if not finished:
            why = f"restore Job {name} failed: {message or 'see its Pods'}"
            self.event("Warning", "RestoreFailed", why)
            return BackupStep(("RestoreFailed", why[:1000]))
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

    # -- spec.backup ---------------------------------------------------------------------------------------

    def apply(self, stack: str, namespace: str, spec: api.StackSpec) -> dict[str, Any]:
        """The claim (created once, never owned by the stack) and the CronJob; status.backup's fields."""
        if spec.backup is None or spec.postgres.managed is None:
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
        return bo.backup_status(bo.claim_of(stack, spec.backup), jobs, pods)

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
        if step.status:
            step.status = {"backup": step.status}
        return step

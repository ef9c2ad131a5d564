"""Reconciling one SingularityStack: the logic behind the kopf handlers (which stay thin).

One idempotent pass: PostgreSQL (managed StatefulSet or external), databases, roles, pgmq and
queues through the project's provisioner, a Secret per service and instance (never regenerating a
password), the workloads, then conditions. Each step reports Events. Migrations: a new service's
database gets the packaged ones before its first pods; a running service's come from its new image,
in a Job that gates its rollout (rollout.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from singularity_operator import api, migration_jobs, naming, objects
from singularity_operator import conditions as cond
from singularity_operator.autoscale import Autoscaler, ScaleMemory
from singularity_operator.backups import Backups
from singularity_operator.kube import Kube
from singularity_operator.rollout import Rollout
from singularity_stack.contract import describe_validation_error
from singularity_stack.provision import budget
from singularity_stack.provision import credentials as creds
from singularity_stack.provision.deprovision import drop_instance, drop_stack
from singularity_stack.provision.errors import PgmqUpgradeRequired
from singularity_stack.provision.provisioner import Endpoint, Provisioner, ProvisionError
from singularity_stack.topology import StackLayout, instance_id

log = logging.getLogger(__name__)
RECONCILES = Counter("singularity_operator_reconciles_total", "Reconciles by result", ["result"])
ERRORS = Counter("singularity_operator_errors_total", "Reconcile failures by reason", ["reason"])
DURATION = Histogram("singularity_operator_reconcile_seconds", "Time for one reconcile")
API_VERSION = f"{api.GROUP}/{api.VERSION}"
CONNECT_TIMEOUT = 5


class RetryLater(Exception):
    """Something outside our control is not there yet (PostgreSQL, a Secret); try again after `delay`."""

    def __init__(self, message: str, delay: float = 15.0) -> None:
        super().__init__(message)
        self.delay = delay


Adopt = Callable[[dict[str, Any]], None]
EventRecorder = Callable[[str, str, str], None]  # (type Normal|Warning, reason, message)


@dataclass
class ReconcileOutcome:
    verdicts: list[cond.Verdict]
    status: dict[str, Any] = field(default_factory=dict)


def _decode(secret: dict[str, Any] | None, key: str) -> str | None:
    if not secret or key not in (secret.get("data") or {}):
        return None
    return base64.b64decode(secret["data"][key]).decode()


def describe_failure(error: Exception) -> str:
    """One line for an Event: the API server's own message for a refused call (not the headers and body
    the client's exception prints), else the exception's first line."""
    body = getattr(error, "body", None)
    if body:
        with contextlib.suppress(ValueError, TypeError, AttributeError, KeyError):
            status = json.loads(body)
            return f"{status.get('code', '')} {status.get('reason', '')}: {status['message']}".strip()
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class StackController:
    def __init__(
        self, kube: Kube, *, adopt: Adopt, event: EventRecorder, scale_memory: ScaleMemory | None = None
    ) -> None:
        self.kube = kube
        self.adopt = adopt
        self.event = event
        self.rollout = Rollout(kube, adopt=adopt, event=event)
        # Shared across reconciles (the operator's handlers keep one): the autoscaler's scale-down window.
        self.autoscaler = Autoscaler(scale_memory if scale_memory is not None else ScaleMemory(), event)

    # -- PostgreSQL ----------------------------------------------------------------------------------

    def _ensure_secret(self, stack: str, namespace: str, name: str, component: str, values: dict[str, str]) -> None:
        secret = objects.generated_secret(stack, namespace, name, component, values)
        self.adopt(secret)
        if self.kube.apply(secret, create_only=True) == "created":
            self.event("Normal", "SecretCreated", f"created Secret {name}")

    def admin_dsn(self, stack: str, namespace: str, spec: api.StackSpec) -> tuple[str, Endpoint, str]:
        """(admin DSN, where services reach Postgres, database/role name prefix)."""
        if spec.postgres.external:
            ext = spec.postgres.external
            secret = self.kube.get("v1", "Secret", ext.admin_secret.name, namespace)
            user, password = (
                _decode(secret, ext.admin_secret.username_key),
                _decode(secret, ext.admin_secret.password_key),
            )
            if user is None or password is None:
                raise RetryLater(
                    f"Secret {ext.admin_secret.name} with keys {ext.admin_secret.username_key} and "
                    f"{ext.admin_secret.password_key} not found"
                )
            dsn = creds.postgres_url(user, password, ext.host, ext.port, ext.database) + f"?sslmode={ext.ssl_mode}"
            return dsn, Endpoint(ext.host, ext.port), objects.database_prefix(namespace, stack)
        name = objects.admin_secret_name(stack)
        existing = _decode(self.kube.get("v1", "Secret", name, namespace), "POSTGRES_PASSWORD")
        password = existing or secrets.token_urlsafe(24)
        self._ensure_secret(stack, namespace, name, "postgres", {"POSTGRES_PASSWORD": password})
        host = f"{objects.postgres_name(stack)}.{namespace}.svc"
        return (
            creds.postgres_url("postgres", password, host, objects.POSTGRES_PORT, "postgres"),
            Endpoint(host, objects.POSTGRES_PORT),
            "",
        )

    def _known_passwords(self, stack: str, namespace: str, layout: StackLayout) -> dict[str, str]:
        known: dict[str, creds.ServiceCredentials] = {}
        for logical in layout.owners:
            secret = self.kube.get("v1", "Secret", objects.credentials_secret_name(stack, logical), namespace)
            url = _decode(secret, "DATABASE_URL")
            if url:
                known[logical] = creds.ServiceCredentials(
                    database_url=url,
                    shared_queue_url=_decode(secret, "SHARED_QUEUE_DB_URL") or url,
                    shared_queue_analytics_url=_decode(secret, "SHARED_QUEUE_ANALYTICS_URL"),
                )
        return creds.known_passwords(known)

    def provision(
        self,
        stack: str,
        namespace: str,
        spec: api.StackSpec,
        admin_dsn: str,
        public: Endpoint,
        prefix: str,
        new: Collection[str] = (),
    ) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """(status, the migrations each logical owner's database records). Only the databases of services
        that have no Deployment yet (`new`) get the operator's packaged migrations, so that they start on a
        schema; a running service's database is migrated by its image's Job (rollout), never from here."""
        layout = StackLayout(spec.singularity.replicas, prefix)
        provisioner = Provisioner(
            admin_dsn + ("&" if "?" in admin_dsn else "?") + f"connect_timeout={CONNECT_TIMEOUT}",
            layout,
            known_passwords=self._known_passwords(stack, namespace, layout),
            public_endpoint=public,
            persist=lambda c: self._write_credentials(stack, namespace, c),
            owner=f"{namespace}/{stack}",
            migrate=new,
        )
        result = provisioner.run()
        for change in result.changes:
            self.event("Normal", "Provisioned", change)
        status = {
            "singularityReplicas": spec.singularity.replicas,
            "pgmq": f"{result.pgmq.version} ({result.pgmq.method})",
            # what each database's _yoyo_migration records, whoever applied it (a Job, or this process)
            "migrations": {layout.database(name): applied for name, applied in result.applied.items()},
        }
        return status, result.applied

    def _write_credentials(self, stack: str, namespace: str, credentials: dict[str, creds.ServiceCredentials]) -> None:
        """One Secret per service and instance, written before anything else can fail: passwords are never lost."""
        for logical, entry in credentials.items():
            secret = objects.credentials_secret(stack, namespace, logical, entry.model_dump())
            self.adopt(secret)
            if self.kube.apply(secret, create_only=True) == "created":
                self.event("Normal", "SecretCreated", f"created Secret {secret['metadata']['name']}")

    # -- workloads ------------------------------------------------------------------------------------

    def apply_workloads(
        self, stack: str, namespace: str, spec: api.StackSpec, deployments: list[dict[str, Any]] | None = None
    ) -> None:
        """Every object of the stack; `deployments` (by name) replace the spec's own (an image held back)."""
        planned = {d["metadata"]["name"]: d for d in deployments or []}
        ui = objects.ui_secret_name(stack)
        self._ensure_secret(stack, namespace, ui, "nexus", {"NEXUS_UI_TOKEN": secrets.token_urlsafe(24)})
        # Created empty and never written again: the reviewers in it are the admin's (kubectl).
        reviewers = objects.reviewers_secret_name(stack)
        self._ensure_secret(stack, namespace, reviewers, "nexus", {objects.REVIEWERS_KEY: "{}\n"})
        for service, key in objects.API_TOKEN_KEYS.items():
            name = objects.api_token_secret_name(stack, service)
            self._ensure_secret(stack, namespace, name, service, {key: secrets.token_urlsafe(24)})
        for desired in objects.workloads(stack, namespace, spec):
            manifest = planned.get(desired["metadata"]["name"], desired) if desired["kind"] == "Deployment" else desired
            self.adopt(manifest)
            done = self.kube.apply(manifest)
            if done:
                self.event("Normal", done.capitalize(), f"{done} {manifest['kind']} {manifest['metadata']['name']}")

    def remove_extra_instances(
        self, stack: str, namespace: str, spec: api.StackSpec, admin_dsn: str, prefix: str
    ) -> None:
        """Workloads of instances above N go; their data stays unless the deletion policy is Delete."""
        selector = f"app.kubernetes.io/instance={stack},app.kubernetes.io/managed-by=singularity-operator"
        for deployment in self.kube.list("apps/v1", "Deployment", namespace, selector):
            component = deployment["metadata"]["labels"].get("app.kubernetes.io/component", "")
            if not component.startswith("singularity-"):
                continue
            index = int(component.rsplit("-", 1)[1])
            if index <= spec.singularity.replicas:
                continue
            name = objects.object_name(stack, instance_id(index))
            self.kube.delete("apps/v1", "Deployment", name, namespace)
            self.kube.delete("v1", "Service", name, namespace)
            self.event("Normal", "ScaledDown", f"removed Singularity instance {index} (workload)")
            if spec.deletion_policy is api.DeletionPolicy.DELETE:
                layout = StackLayout(index, prefix)
                dropped = drop_instance(admin_dsn, layout, index)
                self.kube.delete("v1", "Secret", objects.credentials_secret_name(stack, instance_id(index)), namespace)
                self.event("Normal", "DataDropped", f"instance {index}: dropped {', '.join(dropped) or 'nothing'}")

    def services_verdict(self, stack: str, namespace: str, spec: api.StackSpec) -> cond.Verdict:
        expected = {d["metadata"]["name"] for d in objects.service_deployments(stack, namespace, spec)}
        unavailable = []
        for name in sorted(expected):
            live = self.kube.get("apps/v1", "Deployment", name, namespace)
            if not live or (live.get("status") or {}).get("availableReplicas", 0) < 1:
                unavailable.append(name)
        if unavailable:
            return cond.Verdict(cond.SERVICES, False, "Unavailable", "waiting for " + ", ".join(unavailable))
        return cond.Verdict(cond.SERVICES, True, "Available", f"{len(expected)} deployments available")

    # -- the whole pass -------------------------------------------------------------------------------

    def reconcile(self, stack: str, namespace: str, spec_body: dict[str, Any]) -> ReconcileOutcome:
        started = time.monotonic()
        try:
            outcome = self._reconcile(stack, namespace, spec_body)
            RECONCILES.labels("ok" if all(v.ok for v in outcome.verdicts) else "not_ready").inc()
            return outcome
        except Exception as error:  # an API call refused, a bug: said on the stack, then kopf retries
            RECONCILES.labels("error").inc()
            ERRORS.labels("ReconcileFailed").inc()
            self.event("Warning", "ReconcileFailed", describe_failure(error))
            raise
        finally:
            DURATION.observe(time.monotonic() - started)

    def _reconcile(self, stack: str, namespace: str, spec_body: dict[str, Any]) -> ReconcileOutcome:
        try:
            spec = api.parse_spec(spec_body)
        except ValidationError as error:
            reason = describe_validation_error(error)
            ERRORS.labels("InvalidSpec").inc()
            self.event("Warning", "InvalidSpec", reason)
            return ReconcileOutcome([cond.Verdict(t, False, "InvalidSpec", reason) for t in cond.PARTS])
        name_problem = naming.name_problem(stack, namespace, external=spec.postgres.external is not None)
        if name_problem:
            # Refused whole, before any object exists: the API server would refuse some of them mid-reconcile.
            ERRORS.labels("InvalidName").inc()
            self.event("Warning", "InvalidName", name_problem)
            return ReconcileOutcome([cond.Verdict(t, False, "InvalidName", name_problem) for t in cond.PARTS])
        if spec.postgres.managed:
            # PostgreSQL itself first: provisioning needs it running.
            for manifest in objects.managed_postgres(stack, namespace, spec):
                self.adopt(manifest)
                self.kube.apply(manifest)
        try:
            admin_dsn, public, prefix = self.admin_dsn(stack, namespace, spec)
            if spec.postgres.external:
                # Checked before any new instance is provisioned: the running ones keep serving.
                stack_budget = spec.connection_budget()
                max_connections, reserved = budget.server_limits(admin_dsn, CONNECT_TIMEOUT)
                problem = budget.budget_problem(stack_budget, max_connections, reserved)
                if problem:
                    ERRORS.labels("ConnectionBudgetExceeded").inc()
                    self.event("Warning", "ConnectionBudgetExceeded", problem)
                    return self._not_ready("ConnectionBudgetExceeded", problem)
            # spec.backup's CronJob and status.backup; restoreFrom's Job holds provisioning back until done
            backed_up = Backups(self.kube, adopt=self.adopt, event=self.event).reconcile(
                stack,
                namespace,
                spec,
                admin_dsn,
                public,
                lambda layout: self._known_passwords(stack, namespace, layout),
                lambda credentials: self._write_credentials(stack, namespace, credentials),
            )
            if backed_up.waiting:
                return self._not_ready(*backed_up.waiting, delay=10)
            live = self.live_deployments(stack, namespace, spec)
            new = [logical for logical, deployment in live.items() if deployment is None]
            status, applied = self.provision(stack, namespace, spec, admin_dsn, public, prefix, new)
            status.update(backed_up.status)
            spec, scaled = self.autoscaler.scale(stack, namespace, spec, admin_dsn, prefix, live)
            status.update(scaled)
        except RetryLater as waiting:
            return self._not_ready("Waiting", str(waiting), delay=waiting.delay)
        except PgmqUpgradeRequired as error:
            ERRORS.labels("PgmqUpgradeRequired").inc()
            self.event("Warning", "PgmqUpgradeRequired", str(error))
            return self._queue_not_upgraded(str(error))
        except ProvisionError as error:
            ERRORS.labels("ProvisionFailed").inc()
            self.event("Warning", "ProvisionFailed", str(error))
            return self._not_ready("ProvisionFailed", str(error))
        except psycopg.OperationalError as error:
            ERRORS.labels("PostgresUnreachable").inc()
            message = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
            self.event("Warning", "PostgresUnreachable", message)
            return self._not_ready("PostgresUnreachable", message, delay=10)
        plan = self.rollout.plan(stack, namespace, spec, live)
        self.apply_workloads(stack, namespace, spec, plan.deployments)
        self.remove_extra_instances(stack, namespace, spec, admin_dsn, prefix)
        status["services"] = {
            # no key rather than a null: a merge patch would delete it, and every reconcile would write it again
            logical: {"image": image, **({"lastMigration": applied[logical][-1]} if applied.get(logical) else {})}
            for logical, image in plan.images.items()
        }
        verdicts = [
            cond.Verdict(cond.DATABASES, True, "Provisioned", f"{len(status['migrations'])} databases and their roles"),
            cond.Verdict(cond.QUEUE, True, "QueuesReady", f"pgmq {status['pgmq']}"),
            plan.verdict(status["migrations"]),
            self.services_verdict(stack, namespace, spec),
        ]
        return ReconcileOutcome(verdicts, status)

    def live_deployments(self, stack: str, namespace: str, spec: api.StackSpec) -> dict[str, dict[str, Any] | None]:
        """Each service's and instance's Deployment as it is now (None: not made yet), by logical owner."""
        return {
            migration_jobs.logical_of(d): self.kube.get("apps/v1", "Deployment", d["metadata"]["name"], namespace)
            for d in objects.service_deployments(stack, namespace, spec)
        }

    @staticmethod
    def _queue_not_upgraded(message: str) -> ReconcileOutcome:
        """The databases are there; the shared queue's pgmq needs a hand, and nothing rolls until it has one."""
        return ReconcileOutcome(
            [
                cond.Verdict(cond.DATABASES, True, "Provisioned", "roles and databases exist"),
                cond.Verdict(cond.QUEUE, False, "PgmqUpgradeRequired", message),
                cond.Verdict(cond.MIGRATIONS, None, "PgmqUpgradeRequired", "waiting for the shared queue"),
                cond.Verdict(cond.SERVICES, None, "PgmqUpgradeRequired", "waiting for the shared queue"),
            ]
        )

    def _not_ready(self, reason: str, message: str, delay: float | None = None) -> ReconcileOutcome:
        outcome = ReconcileOutcome(
            [
                cond.Verdict(cond.DATABASES, False, reason, message),
                cond.Verdict(cond.QUEUE, None, reason, "waiting for the databases"),
                cond.Verdict(cond.MIGRATIONS, None, reason, "waiting for the databases"),
                cond.Verdict(cond.SERVICES, None, reason, "waiting for the databases"),
            ]
        )
        outcome.status["retryAfter"] = delay
        return outcome

    # -- deletion ---------------------------------------------------------------------------------------

    def cleanup(self, stack: str, namespace: str, spec_body: dict[str, Any]) -> None:
        """On delete: Retain keeps every database; Delete drops them. Never blocks: a PostgreSQL that is
        already gone (or a spec that no longer parses) is reported as a Warning and deletion goes on."""
        try:
            spec = api.parse_spec(spec_body)
        except ValidationError:
            return
        if spec.deletion_policy is api.DeletionPolicy.RETAIN or spec.postgres.managed:
            # A managed server's data lives in its PVC, which the StatefulSet leaves behind by design.
            if spec.deletion_policy is api.DeletionPolicy.DELETE:
                self._delete_managed_volume(stack, namespace)
            return
        try:
            admin_dsn, _, prefix = self.admin_dsn(stack, namespace, spec)
            dropped = drop_stack(
                admin_dsn + ("&" if "?" in admin_dsn else "?") + f"connect_timeout={CONNECT_TIMEOUT}",
                StackLayout(spec.singularity.replicas, prefix),
                owner=f"{namespace}/{stack}",
            )
            self.event("Normal", "DataDropped", "dropped " + (", ".join(dropped) or "nothing"))
        except (RetryLater, psycopg.OperationalError, ProvisionError) as error:
            self.event("Warning", "CleanupSkipped", f"databases not dropped: {error}")

    def _delete_managed_volume(self, stack: str, namespace: str) -> None:
        claim = f"data-{objects.postgres_name(stack)}-0"
        if self.kube.delete("v1", "PersistentVolumeClaim", claim, namespace):
            self.event("Normal", "DataDropped", f"deleted PersistentVolumeClaim {claim}")

"""Reconciling one SingularityStack: the logic behind the kopf handlers (which stay thin).

One idempotent pass: PostgreSQL (managed StatefulSet or external), databases, roles, pgmq and
queues through the project's provisioner, a Secret per service and instance (never regenerating a
password), the workloads, then conditions. Each step reports Events. Migrations never come from the
operator's own package: every service pod's init container applies its image's (`singularity-stack
migrate <service>`, so a new database gets the schema of the image that runs on it, older or newer than
the operator), and an image change runs the new image's in a Job that gates the rollout (rollout.py).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
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
# Kinds whose objects the stack needs or not by its spec: one it made and no longer wants is deleted.
PRUNED = (
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
)


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
        self._listed_secrets: dict[str, dict[str, Any]] | None = None  # this reconcile's (a controller makes one)
        # Shared across reconciles (the operator's handlers keep one): the autoscaler's scale-down window.
        self.autoscaler = Autoscaler(scale_memory if scale_memory is not None else ScaleMemory(), event)

    # -- PostgreSQL ----------------------------------------------------------------------------------

    def _create_secret(self, stack: str, namespace: str, secret: dict[str, Any]) -> None:
        """A Secret written once, when missing, never again (a password or token is never regenerated)."""
        listed = self._secrets(stack, namespace)
        name = secret["metadata"]["name"]
        if name in listed:
            return
        self.adopt(secret)
        if self.kube.apply(secret, create_only=True, listed=listed) == "created":
            values = secret.get("stringData") or {}
            # as the API server would list it: `data`, base64 (what _known_passwords reads back)
            listed[name] = {**secret, "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}}
            self.event("Normal", "SecretCreated", f"created Secret {name}")
        else:  # there already, without the stack's labels: read, never written over
            listed[name] = self.kube.get("v1", "Secret", name, namespace) or secret

    def _ensure_secret(self, stack: str, namespace: str, name: str, component: str, values: dict[str, str]) -> None:
        self._create_secret(stack, namespace, objects.generated_secret(stack, namespace, name, component, values))

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

    def _secrets(self, stack: str, namespace: str) -> dict[str, dict[str, Any]]:
        """The stack's Secrets by name, listed once per reconcile (by its labels) instead of a GET per Secret;
        kept current by what this controller creates. A Secret without those labels is not in it: created
        over, its create refused as existing, and then read (Kube.apply with `listed`)."""
        if self._listed_secrets is None:
            found = self.kube.list("v1", "Secret", namespace, objects.stack_selector(stack))
            self._listed_secrets = {item["metadata"]["name"]: item for item in found}
        return self._listed_secrets

    def _known_passwords(self, stack: str, namespace: str, layout: StackLayout) -> dict[str, str]:
        known: dict[str, creds.ServiceCredentials] = {}
        listed = self._secrets(stack, namespace)
        for logical in layout.owners:
            secret = listed.get(objects.credentials_secret_name(stack, logical))
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
    ) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """(status, the migrations each logical owner's database records). Roles, databases, queues and
        privileges only: no service database is migrated from here (the image the operator was packaged
        with may be older or newer than the one a service runs). A new database stays empty until its
        pods' init container migrates it; a running service's is migrated by its new image's Job."""
        layout = StackLayout(spec.singularity.replicas, prefix)
        provisioner = Provisioner(
            admin_dsn + ("&" if "?" in admin_dsn else "?") + f"connect_timeout={CONNECT_TIMEOUT}",
            layout,
            known_passwords=self._known_passwords(stack, namespace, layout),
            public_endpoint=public,
            persist=lambda c: self._write_credentials(stack, namespace, c),
            owner=f"{namespace}/{stack}",
            migrate=False,
        )
        result = provisioner.run()
        for change in result.changes:
            self.event("Normal", "Provisioned", change)
        status = {
            "singularityReplicas": spec.singularity.replicas,
            "pgmq": f"{result.pgmq.version} ({result.pgmq.method})",
            # what each database's _yoyo_migration records, as an init container or a Job applied it
            "migrations": {layout.database(name): applied for name, applied in result.applied.items()},
        }
        return status, result.applied

    def _write_credentials(self, stack: str, namespace: str, credentials: dict[str, creds.ServiceCredentials]) -> None:
        """One Secret per service and instance, written before anything else can fail: passwords are never lost."""
        for logical, entry in credentials.items():
            self._create_secret(
                stack, namespace, objects.credentials_secret(stack, namespace, logical, entry.model_dump())
            )

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
        desired = objects.workloads(stack, namespace, spec)
        live = self._live_objects(stack, namespace, {(m["apiVersion"], m["kind"]) for m in desired} | set(PRUNED))
        wanted_names: set[tuple[str, str, str]] = set()
        for wanted in desired:
            manifest = planned.get(wanted["metadata"]["name"], wanted) if wanted["kind"] == "Deployment" else wanted
            self.adopt(manifest)
            wanted_names.add((manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]))
            done = self.kube.apply(manifest, listed=live[(manifest["apiVersion"], manifest["kind"])])
            if done:
                self.event("Normal", done.capitalize(), f"{done} {manifest['kind']} {manifest['metadata']['name']}")
        self._prune(namespace, spec, live, wanted_names)

    def _live_objects(
        self, stack: str, namespace: str, kinds: set[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
        """The stack's objects of these kinds, by (apiVersion, kind) and name: one LIST per kind, by its labels."""
        return {
            (api_version, kind): {
                item["metadata"]["name"]: item
                for item in self.kube.list(api_version, kind, namespace, objects.stack_selector(stack))
            }
            for api_version, kind in sorted(kinds)
        }

    def _prune(
        self,
        namespace: str,
        spec: api.StackSpec,
        live: dict[tuple[str, str], dict[str, dict[str, Any]]],
        wanted: set[tuple[str, str, str]],
    ) -> None:
        """What the stack made and no longer wants, of the kinds whose need follows the spec (spec.genesis.sandbox
        back to bubblewrap: Genesis's ServiceAccount, its RoleBinding and the job Pods' NetworkPolicy). Extra
        instances' Deployments and Services are remove_extra_instances' (with their data, by the policy)."""
        for api_version, kind in PRUNED:
            for name in sorted(live.get((api_version, kind), {})):
                if (api_version, kind, name) not in wanted:
                    self._delete(namespace, spec, api_version, kind, name)

    def _delete(self, namespace: str, spec: api.StackSpec, api_version: str, kind: str, name: str) -> None:
        if self.kube.delete(api_version, kind, name, namespace):
            why = f"genesis.sandbox is {spec.genesis.sandbox.value}" if "genesis" in name else "no longer wanted"
            self.event("Normal", "Deleted", f"deleted {kind} {name} ({why})")

    def remove_extra_instances(
        self, stack: str, namespace: str, spec: api.StackSpec, admin_dsn: str, prefix: str
    ) -> None:
        """Workloads of instances above N go; their data stays unless the deletion policy is Delete."""
        for deployment in self.kube.list("apps/v1", "Deployment", namespace, objects.stack_selector(stack)):
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
        listed = self._deployments(stack, namespace)
        unavailable = []
        for name in sorted(expected):
            live = listed.get(name)
            if not live or (live.get("status") or {}).get("availableReplicas", 0) < 1:
                unavailable.append(name)
        if unavailable:
            return cond.Verdict(cond.SERVICES, False, "Unavailable", "waiting for " + ", ".join(unavailable))
        return cond.Verdict(cond.SERVICES, True, "Available", f"{len(expected)} deployments available")

    # -- the whole pass -------------------------------------------------------------------------------

    def reconcile(self, stack: str, namespace: str, spec_body: dict[str, Any]) -> ReconcileOutcome:
        started = time.monotonic()
        self._listed_secrets = None  # listed afresh by each reconcile
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
            status, applied = self.provision(stack, namespace, spec, admin_dsn, public, prefix)
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
            plan.verdict(status["migrations"], self._awaiting_init(spec, prefix, applied, live)),
            self.services_verdict(stack, namespace, spec),
        ]
        return ReconcileOutcome(verdicts, status)

    @staticmethod
    def _awaiting_init(
        spec: api.StackSpec, prefix: str, applied: dict[str, list[str]], live: dict[str, dict[str, Any] | None]
    ) -> list[str]:
        """The databases that record no migration while no pod of theirs is available yet: their init
        containers have not run (an available pod's has: whatever it recorded is its image's)."""
        layout = StackLayout(spec.singularity.replicas, prefix)
        return [
            layout.database(logical)
            for logical, recorded in applied.items()
            if not recorded and (((live.get(logical) or {}).get("status") or {}).get("availableReplicas") or 0) < 1
        ]

    def live_deployments(self, stack: str, namespace: str, spec: api.StackSpec) -> dict[str, dict[str, Any] | None]:
        """Each service's and instance's Deployment as it is now (None: not made yet), by logical owner."""
        listed = self._deployments(stack, namespace)
        return {
            migration_jobs.logical_of(d): listed.get(d["metadata"]["name"])
            for d in objects.service_deployments(stack, namespace, spec)
        }

    def _deployments(self, stack: str, namespace: str) -> dict[str, dict[str, Any]]:
        """The stack's Deployments as they are now, by name (one LIST)."""
        found = self.kube.list("apps/v1", "Deployment", namespace, objects.stack_selector(stack))
        return {item["metadata"]["name"]: item for item in found}

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

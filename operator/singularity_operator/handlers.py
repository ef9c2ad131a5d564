"""kopf handlers: decorators and plumbing only; the logic is in controller.py.

Create, update and resume run the same idempotent reconcile; a timer re-runs it for health and
drift (it writes nothing when nothing changed: no status patch, no Event); deletion goes through a
finalizer. Nothing is
registered at import: `register(config)` builds the registry the operator runs with.
"""

from __future__ import annotations

import threading
from typing import Any

import kopf
from kubernetes import client
from kubernetes import config as kubeconfig
from prometheus_client import start_http_server

from singularity_operator import api
from singularity_operator import conditions as cond
from singularity_operator.autoscale import ScaleMemory
from singularity_operator.config import OperatorConfig
from singularity_operator.controller import API_VERSION, ReconcileOutcome, StackController
from singularity_operator.kube import Kube

_metrics_ports: set[int] = set()  # a metrics server runs once per process, even when kopf restarts in it


def client_configuration(config: OperatorConfig) -> client.Configuration:
    """How to reach the API server: the kubeconfig file when one is set, else the Pod's ServiceAccount."""
    configuration = client.Configuration()
    if config.kubeconfig is not None:
        kubeconfig.load_kube_config(config_file=str(config.kubeconfig), client_configuration=configuration)
    else:
        kubeconfig.load_incluster_config(client_configuration=configuration)
    return configuration


def _connection_info(configuration: client.Configuration, settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """kopf's credentials from the client's configuration (as kopf's own login_via_client reads them)."""
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        trust_env=settings.networking.trust_env,
    )


class StackHandlers:
    """The handlers of one operator run, all reading the one `OperatorConfig` they were given.

    kopf runs a stack's timer alongside its change handlers: two reconciles of one stack at once would
    race (one sees the roles the other just created, before their Secrets exist). One lock per stack
    serialises them; a timer tick that finds a reconcile running skips, that reconcile checks as much."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self._kube: Kube | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._scale_memory = ScaleMemory()  # the autoscaler's recent recommendations, for every stack

    def _lock(self, body: kopf.Body) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(str(body.meta.get("uid")), threading.Lock())

    def kube(self) -> Kube:
        if self._kube is None:
            self._kube = Kube(client.ApiClient(client_configuration(self.config)))
        return self._kube

    def login(self, settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.ConnectionInfo | None:
        """The configured kubeconfig (development, tests), else the Pod's service account."""
        if self.config.kubeconfig is not None:
            return _connection_info(client_configuration(self.config), settings)
        return kopf.login_with_service_account(settings=settings, **kwargs)

    def configure(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f"{api.GROUP}/cleanup"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=api.GROUP)
        # kopf's own log lines are never Events: every timer tick would post "Timer ... succeeded.". The
        # controller posts an Event for each change and each failure itself (kopf.event).
        settings.posting.loggers = False
        settings.watching.server_timeout = 60
        port = self.config.metrics_port
        if port and port not in _metrics_ports:
            start_http_server(port)
            _metrics_ports.add(port)

    def _controller(self, body: kopf.Body) -> StackController:
        shown = (body.get("status") or {}).get("conditions") or []

        def event(kind: str, reason: str, message: str) -> None:
            if kind == "Warning" and cond.already_reported(shown, reason, message):
                return  # the same failure as last time: the stack already says so, nothing is new
            kopf.event(body, type=kind, reason=reason, message=message[:1000])

        return StackController(
            self.kube(), adopt=lambda obj: kopf.adopt(obj, owner=body), event=event, scale_memory=self._scale_memory
        )

    def _write_status(self, body: kopf.Body, outcome: ReconcileOutcome) -> None:
        """Patch status through /status, and only when it differs (an idle reconcile writes nothing)."""
        current = dict(body.get("status") or {})
        generation = body.meta.get("generation")
        conditions = cond.merge(current.get("conditions", []), cond.with_summary(outcome.verdicts), generation)
        wanted = {
            "observedGeneration": generation,
            "conditions": conditions,
            **{k: v for k, v in outcome.status.items() if k != "retryAfter"},
        }
        patch = status_patch(current, wanted)
        if patch is not None:
            self.kube().patch_status(API_VERSION, api.KIND, body.meta["name"], body.meta["namespace"], patch)

    def _reconcile(self, body: kopf.Body) -> ReconcileOutcome:
        outcome = self._controller(body).reconcile(body.meta["name"], body.meta["namespace"], dict(body.spec))
        self._write_status(body, outcome)
        return outcome

    def reconcile(self, body: kopf.Body, **_: Any) -> None:
        with self._lock(body):
            outcome = self._reconcile(body)
        delay = outcome.status.get("retryAfter")
        if delay:
            raise kopf.TemporaryError(outcome.verdicts[0].message, delay=delay)

    def check_health_and_drift(self, body: kopf.Body, **_: Any) -> None:
        lock = self._lock(body)
        if not lock.acquire(blocking=False):
            return
        try:
            self._reconcile(body)
        finally:
            lock.release()

    def delete(self, body: kopf.Body, **_: Any) -> None:
        with self._lock(body):
            self._controller(body).cleanup(body.meta["name"], body.meta["namespace"], dict(body.spec))
        self._scale_memory.forget(f"{body.meta['namespace']}/{body.meta['name']}")
        with self._locks_lock:
            self._locks.pop(str(body.meta.get("uid")), None)


def status_patch(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The merge patch from the stack's `current` status to `wanted`, or None when nothing differs.

    A top-level key `wanted` holds as None is one the operator owns but has nothing for now (any of them:
    status.autoscale once no service autoscales, status.backup once spec.backup is gone): sent as null when
    the status has it, so the API server removes it (a merge patch keeps what it is not told to drop), and
    left out when it has not. A key `wanted` does not name at all is left as it is: an outcome that stopped
    early (PostgreSQL unreachable) says nothing about the keys of the steps it did not reach."""
    wanted = {k: v for k, v in wanted.items() if v is not None or k in current}
    if all(current.get(k) == v for k, v in wanted.items()):
        return None
    return _merge_patch(current, wanted)


def _merge_patch(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """`wanted` as a JSON merge patch over `current`: a map entry that is gone (an instance scaled away) is
    sent as null, so the API server removes it (a merge patch keeps whatever it is not told to drop)."""
    patch = dict(wanted)
    for key, value in wanted.items():
        old = current.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            patch[key] = {**dict.fromkeys(k for k in old if k not in value), **value}
    return patch


def register(
    config: OperatorConfig, registry: kopf.OperatorRegistry | None = None, handlers: StackHandlers | None = None
) -> kopf.OperatorRegistry:
    """A registry with every handler, configured by `config` (or `handlers`' own, to look into their state
    in tests). The ids are the ones the handlers always had: they name kopf's progress annotations on
    existing stacks."""
    registry = registry if registry is not None else kopf.OperatorRegistry()
    handlers = handlers if handlers is not None else StackHandlers(config)
    resource = (api.GROUP, api.VERSION, api.PLURAL)
    kopf.on.login(registry=registry, id="login")(handlers.login)
    kopf.on.startup(registry=registry, id="configure")(handlers.configure)
    kopf.on.resume(*resource, registry=registry, id="reconcile")(handlers.reconcile)
    kopf.on.create(*resource, registry=registry, id="reconcile")(handlers.reconcile)
    kopf.on.update(*resource, registry=registry, id="reconcile")(handlers.reconcile)
    interval = config.health_interval_seconds
    kopf.timer(*resource, registry=registry, id="check_health_and_drift", interval=interval, initial_delay=interval)(
        handlers.check_health_and_drift
    )
    kopf.on.delete(*resource, registry=registry, id="delete")(handlers.delete)
    return registry

"""kopf handlers: decorators and plumbing only; the logic is in controller.py.

Create, update and resume run the same idempotent reconcile; a timer re-runs it for health and
drift (it writes nothing when nothing changed); deletion goes through a finalizer.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from singularity_operator import api
from singularity_operator import conditions as cond
from singularity_operator.controller import API_VERSION, Outcome, StackController
from singularity_operator.kube import Kube

HEALTH_INTERVAL = float(os.environ.get("HEALTH_INTERVAL_SECONDS", "30"))
METRICS_PORT = int(os.environ.get("OPERATOR_METRICS_PORT", "0"))
_kube: Kube | None = None
_metrics_started = False


def kube() -> Kube:
    global _kube
    if _kube is None:
        if os.environ.get("KUBECONFIG"):
            config.load_kube_config(config_file=os.environ["KUBECONFIG"])
        else:
            config.load_incluster_config()
        _kube = Kube(client.ApiClient())
    return _kube


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """$KUBECONFIG when set (development, tests), else the Pod's service account."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_with_service_account(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{api.GROUP}/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=api.GROUP)
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 60
    global _metrics_started
    if METRICS_PORT and not _metrics_started:  # once per process, even when kopf restarts in it
        start_http_server(METRICS_PORT)
        _metrics_started = True


def _controller(body: kopf.Body) -> StackController:
    def event(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message[:1000])

    return StackController(kube(), adopt=lambda obj: kopf.adopt(obj, owner=body), event=event)


def _write_status(body: kopf.Body, outcome: Outcome) -> None:
    """Patch status through /status, and only when it differs (an idle reconcile writes nothing)."""
    current = dict(body.get("status") or {})
    generation = body.meta.get("generation")
    conditions = cond.merge(current.get("conditions", []), cond.with_summary(outcome.verdicts), generation)
    wanted = {
        "observedGeneration": generation,
        "conditions": conditions,
        **{k: v for k, v in outcome.status.items() if k != "retryAfter"},
    }
    if any(current.get(k) != v for k, v in wanted.items()):
        kube().patch_status(API_VERSION, api.KIND, body.meta["name"], body.meta["namespace"], wanted)


def _reconcile(body: kopf.Body) -> Outcome:
    outcome = _controller(body).reconcile(body.meta["name"], body.meta["namespace"], dict(body.spec))
    _write_status(body, outcome)
    return outcome


@kopf.on.resume(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.create(api.GROUP, api.VERSION, api.PLURAL)
@kopf.on.update(api.GROUP, api.VERSION, api.PLURAL)
def reconcile(body: kopf.Body, **_: Any) -> None:
    outcome = _reconcile(body)
    delay = outcome.status.get("retryAfter")
    if delay:
        raise kopf.TemporaryError(outcome.verdicts[0].message, delay=delay)


@kopf.timer(api.GROUP, api.VERSION, api.PLURAL, interval=HEALTH_INTERVAL, initial_delay=HEALTH_INTERVAL)
def check_health_and_drift(body: kopf.Body, **_: Any) -> None:
    _reconcile(body)


@kopf.on.delete(api.GROUP, api.VERSION, api.PLURAL)
def delete(body: kopf.Body, **_: Any) -> None:
    _controller(body).cleanup(body.meta["name"], body.meta["namespace"], dict(body.spec))

"""Replicas that follow the queue: how many Nexus or Genesis pods a stack's backlog asks for.

Each tick of the operator (its reconcile and health timer) reads the depth and oldest-message age of the
queue a service consumes (llm_requests for Nexus: approvals and questions wait for people, not for pods;
job_requests for Genesis) and recommends `ceil(depth / targetQueueDepth)` replicas, one more than now while
the oldest request is older than `targetOldestAgeSeconds`, within [minReplicas, maxReplicas]. Up at once;
down only to the highest recommendation of the last `stabilizationWindowSeconds`, as the Horizontal Pod
Autoscaler does, so a backlog that comes in bursts does not make pods come and go. The recommendations are
kept in the operator's memory: after a restart the window starts again, which only delays a scale-down.
They are forgotten when a service's autoscale goes from its spec, when its stack is deleted, and once
older than the longest window the CRD allows (a stack deleted while no operator watched).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from singularity_operator import api
from singularity_stack.topology import StackLayout

# The queue whose backlog each scalable service works off.
WORK_QUEUE = {"nexus": "llm_requests", "genesis": "job_requests"}
FORGET_AFTER_S = 3600.0  # the longest stabilizationWindowSeconds the CRD allows: older samples decide nothing


@dataclass(frozen=True)
class Backlog:
    depth: int  # messages in the queue (visible or being handled)
    oldest_age_seconds: int | None


@dataclass(frozen=True)
class Decision:
    current: int
    desired: int
    reason: str

    def status(self) -> dict[str, object]:
        return {"currentReplicas": self.current, "desiredReplicas": self.desired, "reason": self.reason}


def recommend(backlog: Backlog, current: int, spec: api.Autoscale, queue: str) -> tuple[int, str]:
    """The replicas this backlog asks for on its own, and why (no window applied)."""
    wanted = math.ceil(backlog.depth / spec.target_queue_depth)
    reason = f"{queue}: {backlog.depth} waiting, {spec.target_queue_depth} per replica"
    age, target_age = backlog.oldest_age_seconds, spec.target_oldest_age_seconds
    if target_age is not None and age is not None and age > target_age and wanted <= current:
        wanted = current + 1
        reason = f"{queue}: oldest request {age} s old, more than {target_age} s"
    bounded = min(max(wanted, spec.min_replicas), spec.max_replicas)
    if wanted > spec.max_replicas:  # below the minimum is the usual idle floor, not worth a note
        reason += f"; held within {spec.min_replicas}..{spec.max_replicas}"
    return bounded, reason


@dataclass
class ScaleMemory:
    """Recent recommendations per (stack, service), for the scale-down window. Thread-safe: kopf runs
    the handlers of different stacks in threads."""

    clock: Callable[[], float] = time.monotonic
    _seen: dict[tuple[str, str], list[tuple[float, int]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, key: tuple[str, str], current: int, recommended: int, reason: str, window: float) -> Decision:
        now = self.clock()
        with self._lock:
            recent = [(at, n) for at, n in self._seen.get(key, []) if now - at <= window]
            recent.append((now, recommended))
            self._seen[key] = recent
            for stale in [k for k, samples in self._seen.items() if now - samples[-1][0] > FORGET_AFTER_S]:
                del self._seen[stale]
        if recommended >= current:
            return Decision(current, recommended, reason)
        desired = min(current, max(n for _, n in recent))
        if desired > recommended:
            reason += f"; scaling down to {recommended} once it has asked for no more for {window:g} s"
        return Decision(current, desired, reason)

    def forget(self, stack: str, service: str | None = None) -> None:
        """Drop the samples of one service of `stack` ("namespace/name"), or of all its services."""
        with self._lock:
            for key in [k for k in self._seen if k[0] == stack and service in (None, k[1])]:
                del self._seen[key]

    def known(self) -> set[tuple[str, str]]:
        """The (stack, service) pairs with samples."""
        with self._lock:
            return set(self._seen)


def read_backlog(admin_dsn: str, database: str, queue: str, connect_timeout: int = 5) -> Backlog:
    """The queue's depth and oldest-message age, from pgmq's own metrics in the stack's shared queue."""
    dsn = psycopg.conninfo.make_conninfo(admin_dsn, dbname=database, connect_timeout=connect_timeout)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT queue_length, oldest_msg_age_sec FROM pgmq.metrics(%s)", (queue,)).fetchone()
    assert row is not None
    return Backlog(int(row[0]), None if row[1] is None else int(row[1]))


Event = Callable[[str, str, str], None]


class Autoscaler:
    """Sets the replicas of each autoscaled service in a stack's spec from its queue, before it is applied."""

    def __init__(self, memory: ScaleMemory, event: Event) -> None:
        self.memory = memory
        self.event = event

    def scale(
        self,
        stack: str,
        namespace: str,
        spec: api.StackSpec,
        admin_dsn: str,
        prefix: str,
        live: Mapping[str, dict[str, Any] | None],
    ) -> tuple[api.StackSpec, dict[str, Any]]:
        """(the spec with the replicas decided, status.autoscale); the spec unchanged without autoscale, and
        then status.autoscale None: the operator's key with nothing in it, removed from the stack's status."""
        decisions: dict[str, Decision] = {}
        database = StackLayout(spec.singularity.replicas, prefix).shared_queue_database
        for service, queue in WORK_QUEUE.items():
            service_spec: api.ScalableService = getattr(spec, service)
            rule = service_spec.autoscale
            if rule is None:
                self.memory.forget(f"{namespace}/{stack}", service)  # re-enabled later, its window starts anew
                continue
            running = (live.get(service) or {}).get("spec", {}).get("replicas")
            current = int(running) if running else rule.min_replicas
            recommended, reason = recommend(read_backlog(admin_dsn, database, queue), current, rule, queue)
            decision = self.memory.decide(
                (f"{namespace}/{stack}", service), current, recommended, reason, rule.stabilization_window_seconds
            )
            decisions[service] = decision
            if running and decision.desired != current:
                self.event("Normal", "Scaled", f"{service}: {current} -> {decision.desired} replicas ({reason})")
            spec = spec.model_copy(update={service: service_spec.model_copy(update={"replicas": decision.desired})})
        status = {"autoscale": {service: d.status() for service, d in decisions.items()} if decisions else None}
        return spec, status

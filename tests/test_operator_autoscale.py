"""Replicas that follow the queue: the operator scales Genesis (and Nexus) from their queue's backlog.

The decision rules as pure functions, then the operator's reconcile on a real API server against a real
PostgreSQL with pgmq (an external server): requests land in job_requests, the Deployment follows, a
scale-down waits out the stabilization window (a clock the test moves), and an idle tick writes nothing.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator

import psycopg
import pytest
from kubernetes import client, config

from singularity_operator import api, objects
from singularity_operator.autoscale import Backlog, ScaleMemory, recommend
from singularity_operator.controller import StackController
from singularity_operator.kube import Kube
from singularity_stack.postgres.cluster import LocalCluster

RULE = api.Autoscale.model_validate(
    {"minReplicas": 1, "maxReplicas": 4, "targetQueueDepth": 5, "targetOldestAgeSeconds": 30}
)
_namespaces = itertools.count(1)
IDLE = {"currentReplicas": 1, "desiredReplicas": 1, "reason": "job_requests: 0 waiting, 5 per replica"}


@pytest.mark.parametrize(
    ("depth", "age", "current", "wanted", "why"),
    [
        (0, None, 1, 1, "job_requests: 0 waiting, 5 per replica"),
        (12, 1, 1, 3, "job_requests: 12 waiting, 5 per replica"),
        (500, 1, 2, 4, "held within 1..4"),
        (3, 45, 1, 2, "oldest request 45 s old, more than 30 s"),  # few requests, but they wait too long
        (3, 45, 4, 4, "held within 1..4"),
        (20, 45, 2, 4, "20 waiting"),  # the depth already asks for more than one extra
    ],
)
def test_the_recommendation_follows_depth_and_age_within_the_bounds(depth, age, current, wanted, why):
    replicas, reason = recommend(Backlog(depth, age), current, RULE, "job_requests")
    assert replicas == wanted
    assert why in reason


def test_up_at_once_down_only_to_the_most_the_window_asked_for():
    now = [0.0]
    memory = ScaleMemory(clock=lambda: now[0])
    key = ("ns/s", "genesis")
    assert memory.decide(key, 1, 4, "burst", 60).desired == 4  # up at once
    now[0] = 10
    assert memory.decide(key, 4, 2, "less", 60).desired == 4  # 4 was asked 10 s ago
    now[0] = 61
    assert memory.decide(key, 4, 1, "idle", 60).desired == 2  # the 4 left the window; the 2 has not
    now[0] = 71.5
    decision = memory.decide(key, 2, 1, "idle", 60)
    assert (decision.current, decision.desired) == (2, 1)


def test_min_above_max_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"minReplicas \(5\) is more than maxReplicas \(2\)"):
        api.Autoscale.model_validate({"minReplicas": 5, "maxReplicas": 2, "targetQueueDepth": 1})


def test_the_connection_budget_admits_the_most_replicas_autoscaling_may_reach():
    fixed = api.parse_spec({"genesis": {"replicas": 1}}).connection_budget().stack
    scaled = api.parse_spec({"genesis": {"autoscale": {"maxReplicas": 4, "targetQueueDepth": 5}}})
    per_pod = 2 * scaled.connections.service_pool_size + 1
    assert scaled.connection_budget().stack == fixed + 3 * per_pod


# -- the operator, on a real API server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_client(kube) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kube.kubeconfig))


@pytest.fixture
def namespace(api_client, pg_cluster: LocalCluster) -> Iterator[str]:
    core = client.CoreV1Api(api_client)
    name = f"autoscale-{next(_namespaces)}"
    core.create_namespace({"metadata": {"name": name}})
    secret = {"username": "postgres", "password": pg_cluster.password}
    core.create_namespaced_secret(
        name,
        {
            "metadata": {"name": "pg-admin"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
        },
    )
    yield name
    core.delete_namespace(name)


def send_jobs(pg_cluster: LocalCluster, namespace: str, count: int) -> None:
    database = objects.database_prefix(namespace, "scaled") + "shared_queue"
    with psycopg.connect(pg_cluster.dsn(), dbname=database, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send_batch('job_requests', array_fill('{}'::jsonb, ARRAY[%s]))", (count,))


def purge_jobs(pg_cluster: LocalCluster, namespace: str) -> None:
    database = objects.database_prefix(namespace, "scaled") + "shared_queue"
    with psycopg.connect(pg_cluster.dsn(), dbname=database, autocommit=True) as conn:
        conn.execute("SELECT pgmq.purge_queue('job_requests')")


def test_genesis_follows_its_queue_up_and_back_down_after_the_window(api_client, namespace, pg_cluster):
    now = [1000.0]
    events: list[tuple[str, ...]] = []
    operator = StackController(
        Kube(api_client),
        adopt=lambda obj: None,
        event=lambda *e: events.append(e),
        scale_memory=ScaleMemory(clock=lambda: now[0]),
    )
    spec = {
        "postgres": {"external": {"host": "127.0.0.1", "port": pg_cluster.port, "adminSecret": {"name": "pg-admin"}}},
        "genesis": {
            "autoscale": {"minReplicas": 1, "maxReplicas": 4, "targetQueueDepth": 5, "stabilizationWindowSeconds": 60}
        },
    }
    apps = client.AppsV1Api(api_client)

    def reconcile() -> dict:
        outcome = operator.reconcile("scaled", namespace, spec)
        assert [(v.type, v.ok) for v in outcome.verdicts if v.ok is False] == [("ServicesAvailable", False)], (
            outcome.verdicts
        )
        return outcome.status["autoscale"]["genesis"]

    def replicas() -> int:
        return int(apps.read_namespaced_deployment("scaled-genesis", namespace).spec.replicas)

    assert reconcile() == IDLE
    assert replicas() == 1
    send_jobs(pg_cluster, namespace, 12)
    assert reconcile()["desiredReplicas"] == 3
    assert replicas() == 3
    scaled = [e for e in events if e[1] == "Scaled"]
    assert scaled == [("Normal", "Scaled", "genesis: 1 -> 3 replicas (job_requests: 12 waiting, 5 per replica)")]
    send_jobs(pg_cluster, namespace, 30)
    status = reconcile()
    assert (status["desiredReplicas"], replicas()) == (4, 4)
    assert "held within 1..4" in status["reason"]

    purge_jobs(pg_cluster, namespace)  # the queue drained
    now[0] += 30
    status = reconcile()
    assert (status["desiredReplicas"], replicas()) == (4, 4)  # within the window: no flapping
    assert "scaling down to 1 once it has asked for no more for 60 s" in status["reason"]
    now[0] += 31
    assert reconcile()["desiredReplicas"] == 1
    assert replicas() == 1

    # Idle: the same backlog and replicas tick after tick, and the Deployment is not written again: its
    # generation (bumped by any spec write) stays and the operator reports no write (each is an Event). Not
    # its resourceVersion: where another test started the shared control plane's controller-manager, the
    # Deployment controller writes the status of the scale-down a moment later.
    generation = apps.read_namespaced_deployment("scaled-genesis", namespace).metadata.generation
    seen = len(events)
    now[0] += 5
    assert reconcile() == IDLE
    assert apps.read_namespaced_deployment("scaled-genesis", namespace).metadata.generation == generation
    assert events[seen:] == []

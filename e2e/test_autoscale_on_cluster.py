"""On the local node: Genesis's replicas follow job_requests (spec.genesis.autoscale).

The chart's operator is re-applied with a short health interval (operator.healthIntervalSeconds), so its
timer reads the queue every few seconds. A stack with Genesis autoscaled (1..3 replicas, 4 jobs per replica,
a 20 s window) is applied; singularity_1, with its own credentials, publishes a burst of real jobs (python
sleeping 2 s) into job_requests. Genesis's Deployment goes up to 3 and its Pods run; status.autoscale.genesis
says how many and why; the queue drains, every job answered ok in singularity_1's job_results; after the
window it goes back to 1; a Scaled Event for each change.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml

from singularity_stack.contract import JobRequest, JobResult, JobStatus, Language
from singularity_stack_testing import manifests
from singularity_stack_testing.cluster import OPERATOR_NAMESPACE, TIMINGS, Cluster, wait_until
from singularity_stack_testing.providers import operator_pods
from singularity_stack_testing.stacks import NAMESPACE, OTHER_PODS, example, stack_status, wait_ready

pytestmark = pytest.mark.timeout(1800)
STACK = "autoscaled"
HEALTH_INTERVAL = 5
WINDOW = 20
RULE = {"minReplicas": 1, "maxReplicas": 3, "targetQueueDepth": 4, "stabilizationWindowSeconds": WINDOW}
JOBS = 60  # at 2 s each and 2 at a time per Genesis Pod: a minute's work for one Pod
CODE = 'import time\n\ntime.sleep(2)\nprint("slept")\n'
GENESIS = f"app.kubernetes.io/instance={STACK},app.kubernetes.io/component=genesis"


def secret_value(cluster: Cluster, name: str, key: str) -> str:
    return base64.b64decode(cluster.json("get", "secret", name, "-n", NAMESPACE)["data"][key]).decode()


def apply_operator(cluster: Cluster, values: dict[str, Any]) -> None:
    """The chart's operator Deployment as rendered with `values`, rolled out (Recreate: one operator at a time)."""
    server = cluster.json("version")["serverVersion"]["gitVersion"]
    rendered = manifests.render_templates(values, server, namespace=OPERATOR_NAMESPACE)
    docs = [doc for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc and doc["kind"] == "Deployment"]  # fmt: skip
    assert len(docs) == 1, [d["metadata"]["name"] for d in docs]
    cluster.kubectl("apply", "-n", OPERATOR_NAMESPACE, "-f", "-", stdin=yaml.safe_dump(docs[0]))
    name = docs[0]["metadata"]["name"]
    cluster.kubectl("rollout", "status", "-n", OPERATOR_NAMESPACE, f"deployment/{name}", "--timeout=300s")
    wait_until("one Ready operator", lambda: len(operator_pods(cluster, ready=True)) == 1, 300)


@pytest.fixture(scope="module")
def fast_ticks(operator_installed: Cluster) -> Iterator[Cluster]:
    cluster = operator_installed
    apply_operator(cluster, {"operator": {"healthIntervalSeconds": HEALTH_INTERVAL}})
    (pod,) = operator_pods(cluster, ready=True)
    env = cluster.json("get", "pod", pod, "-n", OPERATOR_NAMESPACE)["spec"]["containers"][0]["env"]
    assert {"name": "HEALTH_INTERVAL_SECONDS", "value": str(HEALTH_INTERVAL)} in env
    yield cluster
    apply_operator(cluster, {})  # the chart's default again, for whatever runs next on this cluster


def genesis_replicas(cluster: Cluster) -> int:
    return int(cluster.json("get", "deployment", f"{STACK}-genesis", "-n", NAMESPACE)["spec"]["replicas"])


def genesis_pods(cluster: Cluster) -> tuple[int, int]:
    """(Genesis Pods Running, Genesis Pods at all, terminating ones included)."""
    pods = cluster.json("get", "pods", "-n", NAMESPACE, "-l", GENESIS)["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    return sum(p["status"].get("phase") == "Running" for p in live), len(pods)


def scaling(cluster: Cluster) -> dict[str, Any]:
    return dict((stack_status(cluster, STACK).get("autoscale") or {}).get("genesis") or {})


def scaled_events(cluster: Cluster) -> list[str]:
    events = cluster.json("get", "events", "-n", NAMESPACE)["items"]
    mine = [e for e in events if e["involvedObject"].get("name") == STACK and e.get("reason") == "Scaled"]
    return [e["message"] for e in sorted(mine, key=lambda e: e.get("firstTimestamp") or "")]


def test_a_burst_of_jobs_scales_genesis_up_the_queue_drains_and_it_scales_back_down(fast_ticks: Cluster) -> None:
    cluster = fast_ticks
    stack = example(STACK, replicas=1, deletion_policy="Delete")
    stack["spec"]["genesis"] = {"autoscale": RULE}
    cluster.apply(stack)
    wait_ready(cluster, STACK, OTHER_PODS + 1)
    idle = wait_until("status.autoscale.genesis", lambda: scaling(cluster), 120)
    assert idle == {"currentReplicas": 1, "desiredReplicas": 1, "reason": "job_requests: 0 waiting, 4 per replica"}
    assert genesis_replicas(cluster) == 1

    # singularity_1 sends, with its own role: PostgreSQL binds each request to it as the sender.
    url = secret_value(cluster, f"{STACK}-singularity-1-db", "SHARED_QUEUE_DB_URL")
    admin_password = secret_value(cluster, f"{STACK}-postgres-admin", "POSTGRES_PASSWORD")
    requests = [
        JobRequest(reply_to="singularity_1", agent_id="e2e-autoscale", code=CODE, language=Language.PYTHON)
        for _ in range(JOBS)
    ]
    with cluster.service_address(NAMESPACE, f"{STACK}-postgres", 5432) as (host, port):
        sender = psycopg.conninfo.make_conninfo(url, host=host, port=str(port), connect_timeout=10)
        admin = (
            f"host={host} port={port} user=postgres password={admin_password} dbname=shared_queue connect_timeout=10"
        )
        with psycopg.connect(sender, autocommit=True) as conn:
            conn.execute(
                "SELECT pgmq.send_batch('job_requests', ARRAY(SELECT jsonb_array_elements(%s::jsonb)))",
                ("[" + ",".join(r.model_dump_json() for r in requests) + "]",),
            )
        started = time.monotonic()

        up = wait_until("Genesis scaled to 3", lambda: (s := scaling(cluster)).get("desiredReplicas") == 3 and s, 60)
        assert up["reason"].startswith("job_requests: ") and "4 per replica" in up["reason"], up
        TIMINGS["autoscale: burst -> desired 3"] = time.monotonic() - started
        assert genesis_replicas(cluster) == 3
        wait_until("3 Genesis Pods Running", lambda: genesis_pods(cluster)[0] == 3, 180)
        TIMINGS["autoscale: burst -> 3 Genesis Running"] = time.monotonic() - started
        shown = wait_until(
            "status to show 3 current", lambda: (s := scaling(cluster))["currentReplicas"] == 3 and s, 60
        )
        assert shown["desiredReplicas"] == 3, shown

        def depth() -> int:
            with psycopg.connect(admin, autocommit=True) as conn:
                row = conn.execute("SELECT queue_length FROM pgmq.metrics('job_requests')").fetchone()
            assert row is not None
            return int(row[0])

        def answered() -> dict[str, JobResult]:
            with psycopg.connect(admin, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT message FROM pgmq.q_job_results_singularity_1"
                    " UNION ALL SELECT message FROM pgmq.a_job_results_singularity_1"
                ).fetchall()
            results = [JobResult.model_validate(row[0]) for row in rows]
            return {str(r.request_id): r for r in results}

        wait_until("job_requests to drain", lambda: depth() == 0, 300)
        drained = time.monotonic()
        TIMINGS["autoscale: burst -> drained (60 jobs)"] = drained - started
        ids = {str(r.request_id) for r in requests}
        results = wait_until("a reply to every job", lambda: (a := answered()) and ids <= a.keys() and a, 60)
        statuses = {results[i].status for i in ids}
        assert statuses == {JobStatus.OK}, {i: (results[i].status, results[i].error) for i in ids}
        assert all(results[i].output == "slept\n" and results[i].recipient == "singularity_1" for i in ids)

    # Drained: held up through the window (no flapping), then down to the minimum.
    held = wait_until(
        "the window to hold Genesis up",
        lambda: "scaling down to 1 once it has asked for no more for 20 s" in (s := scaling(cluster))["reason"] and s,
        60,
    )
    assert held["currentReplicas"] > 1 and held["desiredReplicas"] > 1, held
    wait_until("Genesis back to 1", lambda: genesis_replicas(cluster) == 1, WINDOW + 6 * HEALTH_INTERVAL + 30)
    # The last tick that asked for more than 1 came at most a tick before the queue was seen empty.
    assert time.monotonic() - drained >= WINDOW - 2 * HEALTH_INTERVAL
    TIMINGS["autoscale: drained -> back to 1"] = time.monotonic() - drained
    wait_until("one Genesis Pod", lambda: genesis_pods(cluster) == (1, 1), 180)
    final = wait_until("status to show 1", lambda: (s := scaling(cluster))["currentReplicas"] == 1 and s, 60)
    assert final == idle, final

    events = scaled_events(cluster)
    assert any(m.startswith("genesis: 1 -> ") for m in events), events
    assert events[-1].startswith("genesis: ") and " -> 1 replicas (job_requests: 0 waiting" in events[-1], events
    assert not any(m.startswith("nexus") for m in events), events

    cluster.kubectl("delete", "singularitystack", STACK, "-n", NAMESPACE, "--wait=true", "--timeout=5m")
    selector = f"app.kubernetes.io/instance={STACK}"
    wait_until(
        f"{STACK}'s Pods to go", lambda: not cluster.json("get", "pods", "-n", NAMESPACE, "-l", selector)["items"], 300
    )

"""Monitoring a team can plug in: the chart's PodMonitors, alerts and dashboard, and every metric they use is
really exported by the running services, the operator and managed PostgreSQL's exporter."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest
from live_services import live_service
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_chart import render

from singularity_stack.postgres.cluster import LocalCluster, free_port

EXPORTER = "/usr/bin/prometheus-postgres-exporter"
ENABLED = {"monitoring": {k: {"enabled": True} for k in ("podMonitors", "rules", "dashboard")}}
METRIC = re.compile(r"\b((?:singularity|pg)_[a-z0-9_]+)\b")


def monitoring_docs(values: dict | None = None) -> dict[str, list[dict]]:
    docs = render(ENABLED if values is None else values)
    wanted = {"PodMonitor", "PrometheusRule", "ConfigMap"}
    found: dict[str, list[dict]] = {}
    for doc in docs:
        if doc["kind"] in wanted:
            found.setdefault(doc["kind"], []).append(doc)
    return found


def used_metric_names() -> set[str]:
    docs = monitoring_docs()
    [rule] = docs["PrometheusRule"]
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    [dashboard] = docs["ConfigMap"]
    board = json.loads(dashboard["data"]["singularity-stack.json"])
    exprs += [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return {name for expr in exprs for name in METRIC.findall(expr)}


def exported_names(text: str) -> set[str]:
    """Every name a scrape of `text` can match: samples, and the series a labelled metric will have."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_monitoring_is_off_by_default_and_complete_when_enabled():
    assert monitoring_docs({}) == {}
    docs = monitoring_docs()
    operator, stacks = docs["PodMonitor"]
    assert operator["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert stacks["spec"]["namespaceSelector"] == {"any": True}
    assert {e["port"] for e in stacks["spec"]["podMetricsEndpoints"]} == {"http", "metrics"}
    [rule] = docs["PrometheusRule"]
    alerts = {r["alert"] for r in rule["spec"]["groups"][0]["rules"]}
    assert alerts == {
        "SingularityDeadLettersGrowing",
        "SingularityRequestWaitingTooLong",
        "SingularityGenesisSandboxNotReady",
        "SingularityOperatorReconcileErrors",
        "SingularityTaskFailureRate",
        "SingularityPostgresDown",
    }
    [dashboard] = docs["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"  # the Grafana sidecar's label
    # A namespaced install monitors only its namespaces.
    scoped = monitoring_docs({**ENABLED, "watchNamespaces": ["team-a"]})["PodMonitor"][1]
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_the_pod_monitors_select_what_the_operator_creates():
    from singularity_operator import api, objects

    [_operator, stacks] = monitoring_docs()["PodMonitor"]
    spec = api.parse_spec({})
    selected = stacks["spec"]["selector"]["matchLabels"]
    pods = [m for m in objects.workloads("s", "ns", spec) if m["kind"] in ("Deployment", "StatefulSet")]
    ports = set()
    for pod in pods:
        template = pod["spec"]["template"]
        assert selected.items() <= template["metadata"]["labels"].items(), pod["metadata"]["name"]
        ports |= {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
    assert {"http", "metrics"} <= ports


@pytest.fixture
def postgres_exporter(pg_cluster: LocalCluster) -> Iterator[str]:
    if not os.path.exists(EXPORTER):
        pytest.fail(f"{EXPORTER} is missing: apt-get install prometheus-postgres-exporter", pytrace=False)
    port = free_port()
    env = {
        "DATA_SOURCE_URI": f"{pg_cluster.host}:{pg_cluster.port}/postgres?sslmode=disable",
        "DATA_SOURCE_USER": "postgres",
        "DATA_SOURCE_PASS": pg_cluster.password,
    }
    process = subprocess.Popen(
        [EXPORTER, f"--web.listen-address=127.0.0.1:{port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        process.terminate()
        process.wait(10)


def scrape(url: str, must_have: str, timeout: float = 30) -> str:
    """The metrics at `url` once `must_have` appears in them (a periodic job may not have run yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = httpx.get(url, timeout=5).text
            if must_have in text:
                return text
        except httpx.HTTPError:
            text = ""
        assert time.monotonic() < deadline, f"{url}: no {must_have} in\n{text[-2000:]}"
        time.sleep(0.2)


def test_every_metric_the_rules_and_dashboard_use_is_exported(provision_stack, postgres_exporter):
    import singularity_operator.controller  # noqa: F401  (registers the operator's metrics, as its process does)

    used = used_metric_names()
    assert {"singularity_queue_depth", "pg_up", "singularity_operator_errors_total"} <= used
    result = provision_stack(1)
    exported = exported_names(generate_latest(REGISTRY).decode())
    with ExitStack() as services:
        for logical, sign in (
            ("centralcloud", "singularity_queue_depth{"),  # after its first queue sample
            ("genesis", "singularity_genesis_sandbox_ready"),
            ("nexus", "singularity_queue_batch_seconds"),
            ("singularity_1", "singularity_tasks_total{"),
        ):
            service = services.enter_context(live_service(result, logical, METRICS_INTERVAL_SECONDS="1"))
            exported |= exported_names(scrape(f"{service.url}/metrics", sign))
    postgres = scrape(postgres_exporter, "pg_up 1")
    exported |= exported_names(postgres)
    assert "pg_stat_activity_count" in exported
    assert used - exported == set(), f"used by the rules or dashboard but exported by nothing: {used - exported}"


SUMMARIES = {  # what a person reads when it fires, with the labels and values filled in
    "SingularityDeadLettersGrowing": "Dead letters are piling up in job_requests_dlq (team)",
    "SingularityRequestWaitingTooLong": "The oldest message in llm_requests has waited 20m 0s",
    "SingularityGenesisSandboxNotReady": "Genesis in team cannot run jobs in its sandbox",
    "SingularityPostgresDown": "Managed PostgreSQL in team does not answer its exporter",
    "SingularityTaskFailureRate": "75% of tasks fail in team",
    "SingularityOperatorReconcileErrors": "The operator failed to reconcile: InvalidSpec",
}
ALERT_TESTS = {
    "SingularityDeadLettersGrowing": (
        "singularity_queue_depth",
        {"queue": "job_requests_dlq", "namespace": "team"},
        "0 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    ),
    "SingularityRequestWaitingTooLong": (
        "singularity_queue_oldest_message_age_seconds",
        {"queue": "llm_requests", "namespace": "team"},
        "0+60x20",  # a minute older every minute
    ),
    "SingularityGenesisSandboxNotReady": (
        "singularity_genesis_sandbox_ready",
        {"namespace": "team"},
        "0x20",
    ),
    "SingularityPostgresDown": ("pg_up", {"namespace": "team"}, "0x20"),
    "SingularityOperatorReconcileErrors": (
        "singularity_operator_errors_total",
        {"reason": "InvalidSpec"},
        "0x10 1x10",  # one error ten minutes ago
    ),
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: apt-get install prometheus (Debian ships promtool in it)", pytrace=False)
    return found


def rules_file(tmp_path) -> str:
    [rule] = monitoring_docs()["PrometheusRule"]
    path = tmp_path / "rules.yaml"
    path.write_text(json.dumps({"groups": rule["spec"]["groups"]}))
    return str(path)


def test_prometheus_accepts_the_rules(tmp_path):
    subprocess.run([promtool(), "check", "rules", rules_file(tmp_path)], check=True, capture_output=True)


def expected(alert: str, labels: dict[str, str]) -> dict[str, object]:
    [rule] = monitoring_docs()["PrometheusRule"]
    [found] = [r for r in rule["spec"]["groups"][0]["rules"] if r.get("alert") == alert]
    annotations = {"summary": SUMMARIES[alert], "description": found["annotations"]["description"]}
    return {"exp_labels": {**labels, "severity": found["labels"]["severity"]}, "exp_annotations": annotations}


def test_each_alert_fires_on_what_it_watches_and_not_on_a_healthy_stack(tmp_path):
    """promtool's rule unit tests: series fed minute by minute, alerts asserted at 20 minutes."""
    tests = []
    for alert, (metric, labels, values) in ALERT_TESTS.items():
        series = metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        tests.append(
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": values}],
                "alert_rule_test": [
                    {
                        "eval_time": "20m",
                        "alertname": alert,
                        "exp_alerts": [expected(alert, labels)],
                    }
                ],
            }
        )
    # The failure ratio: 3 of 4 tasks failing per minute, against a threshold of 0.2.
    tests.append(
        {
            "interval": "1m",
            "input_series": [
                {"series": 'singularity_tasks_total{outcome="failed",namespace="team"}', "values": "0+3x40"},
                {"series": 'singularity_tasks_total{outcome="succeeded",namespace="team"}', "values": "0+1x40"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "40m",
                    "alertname": "SingularityTaskFailureRate",
                    "exp_alerts": [expected("SingularityTaskFailureRate", {"namespace": "team"})],
                }
            ],
        }
    )
    # A healthy stack: nothing fires.
    healthy = [
        ('singularity_queue_depth{queue="job_requests_dlq",namespace="team"}', "0x20"),
        ('singularity_queue_oldest_message_age_seconds{queue="llm_requests",namespace="team"}', "5x20"),
        ('singularity_genesis_sandbox_ready{namespace="team"}', "1x20"),
        ('pg_up{namespace="team"}', "1x20"),
        ('singularity_operator_errors_total{reason="InvalidSpec"}', "3x20"),  # old errors, none new
        ('singularity_tasks_total{outcome="failed",namespace="team"}', "0x20"),
        ('singularity_tasks_total{outcome="succeeded",namespace="team"}', "0+5x20"),
    ]
    tests.append(
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in healthy],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": alert, "exp_alerts": []}
                for alert in [*ALERT_TESTS, "SingularityTaskFailureRate"]
            ],
        }
    )
    spec = tmp_path / "alerts_test.yaml"
    spec.write_text(json.dumps({"rule_files": [rules_file(tmp_path)], "tests": tests}))
    run = subprocess.run([promtool(), "test", "rules", str(spec)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr

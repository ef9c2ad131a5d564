"""On a real node: a stack with `spec.genesis.sandbox: pod` runs each Genesis job in a Pod of its own.

The whole task flow runs through the live system with Genesis in pod mode; then hostile jobs (a fork bomb,
a memory hog, an endless loop, a network call) run as Genesis runs them (its PodRunner, in the stack's
namespace, with the labels and image the operator gives Genesis), each in a real job Pod on the node. What is
checked is what the requester receives and the cluster's own record: the job Pod is gone afterwards, and
the result says why the job ended.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import psycopg
import psycopg.conninfo
import pytest
from kubernetes import client, config

from singularity_stack import contract as c
from singularity_stack.contract import JobStatus
from singularity_stack.genesis.pod_sandbox import JOB_COMPONENT, PodRunner, PodSandboxSettings
from singularity_stack.genesis.runner import JobOutcome, JobRunner
from singularity_stack.sharedqueue import SharedQueue
from singularity_stack_testing.cluster import IMAGE, TIMINGS, Cluster, wait_until
from singularity_stack_testing.stacks import NAMESPACE, OTHER_PODS, example, stack_pods, wait_ready

pytestmark = pytest.mark.timeout(1800)
STACK = "podbox"


def secret_value(cluster: Cluster, name: str, key: str) -> str:
    return base64.b64decode(cluster.json("get", "secret", name, "-n", NAMESPACE)["data"][key]).decode()


def job_pods(cluster: Cluster) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={STACK},app.kubernetes.io/component={JOB_COMPONENT}"
    return cluster.json("get", "pods", "-n", NAMESPACE, "-l", selector)["items"]


def genesis_pod(cluster: Cluster) -> dict[str, Any]:
    [pod] = [
        p for p in stack_pods(cluster, STACK) if p["metadata"]["labels"]["app.kubernetes.io/component"] == "genesis"
    ]
    return pod


@pytest.fixture(scope="module")
def pod_stack(operator_installed: Cluster) -> Cluster:
    cluster = operator_installed
    stack = example(name=STACK)
    stack["spec"].setdefault("genesis", {})["sandbox"] = "pod"
    cluster.apply(stack)
    wait_ready(cluster, STACK, OTHER_PODS + 1)
    return cluster


def test_genesis_in_pod_mode_runs_on_runtime_default_with_its_own_account(pod_stack: Cluster) -> None:
    pod = genesis_pod(pod_stack)
    spec = pod["spec"]
    assert spec["serviceAccountName"] == f"{STACK}-genesis"
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "seccompProfile" not in spec["containers"][0]["securityContext"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["GENESIS_SANDBOX"] == "pod"
    assert all(c["ready"] for c in pod["status"]["containerStatuses"])  # /readyz: it may manage job Pods


def test_a_task_runs_through_the_live_system_with_jobs_in_pods(pod_stack: Cluster) -> None:
    cluster = pod_stack
    token = secret_value(cluster, f"{STACK}-nexus-ui", "NEXUS_UI_TOKEN")
    api_token = secret_value(cluster, f"{STACK}-singularity-api", "SINGULARITY_API_TOKEN")
    with (
        cluster.service_address(NAMESPACE, f"{STACK}-singularity-1", 8000) as singularity,
        cluster.service_address(NAMESPACE, f"{STACK}-nexus", 8000) as nexus,
    ):
        singularity_api = httpx.Client(
            base_url=f"http://{singularity[0]}:{singularity[1]}",
            headers={"Host": f"{STACK}-singularity-1.{NAMESPACE}.svc", "Authorization": f"Bearer {api_token}"},
            timeout=10,
        )
        nexus_api = httpx.Client(
            base_url=f"http://{nexus[0]}:{nexus[1]}",
            headers={"Host": f"{STACK}-nexus.{NAMESPACE}.svc", "Authorization": f"Bearer {token}"},
            timeout=10,
        )
        created = singularity_api.post("/tasks", json={"description": "Write a program that prints a greeting"})
        assert created.status_code == 202, created.text
        task_id = created.json()["id"]

        def pending_approval() -> dict | None:
            approvals = nexus_api.get("/api/pending").json()["approvals"]
            return next((a for a in approvals if a["instance"] == "singularity_1"), None)

        card = wait_until("the approval card in Nexus", pending_approval, 300)
        approved = nexus_api.post(f"/api/approvals/{card['request_id']}", json={"approved": True, "reason": ""})
        assert approved.status_code == 200, approved.text

        def finished() -> dict | None:
            task = singularity_api.get(f"/tasks/{task_id}").json()
            return task if task["state"] in ("succeeded", "failed") else None

        task = wait_until("the task to finish", finished, 300)
        assert task["state"] == "succeeded", task.get("failure_reason")
    # The jobs ran in Pods of their own (the node's record of them), and none is left.
    events = cluster.json("get", "events", "-n", NAMESPACE)["items"]
    started = {
        e["involvedObject"]["name"]
        for e in events
        if e["involvedObject"]["kind"] == "Pod"
        and e["involvedObject"]["name"].startswith("genesis-job-")
        and e["reason"] == "Started"
    }
    assert started, "no job Pod was started"
    wait_until("no job Pod left", lambda: not job_pods(cluster), 60)


@pytest.fixture(scope="module")
def runner(pod_stack: Cluster) -> PodRunner:
    """Genesis's PodRunner with the settings the operator gives Genesis, from the host."""
    env = {e["name"]: e.get("value", "") for e in genesis_pod(pod_stack)["spec"]["containers"][0]["env"]}
    assert env["GENESIS_JOB_IMAGE"] == IMAGE
    settings = PodSandboxSettings(
        job_image=env["GENESIS_JOB_IMAGE"],
        job_namespace=NAMESPACE,
        job_labels=env["GENESIS_JOB_LABELS"],
        image_pull_policy=env["GENESIS_JOB_IMAGE_PULL_POLICY"],
        pod_name="e2e-host",
    )
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(pod_stack.kubeconfig)))
    return PodRunner(core, settings, max_concurrent=2)


def run_job(cluster: Cluster, runner: PodRunner, code: str, language: str) -> JobOutcome:
    started = time.monotonic()
    outcome = asyncio.run(runner.run(code, language))
    print(f"{language} job: {outcome.status.value} in {time.monotonic() - started:.1f} s")
    assert not job_pods(cluster), "the job Pod outlived its job"
    return outcome


def test_a_fork_bomb_is_contained(pod_stack: Cluster, runner: PodRunner) -> None:
    outcome = run_job(pod_stack, runner, ":(){ :|:& };:\nsleep 60\n", "bash")
    assert outcome.status is JobStatus.TIMEOUT and outcome.exit_code is None, outcome
    assert "fork: retry: Resource temporarily unavailable" in outcome.stderr


def test_a_memory_hog_is_contained(pod_stack: Cluster, runner: PodRunner) -> None:
    outcome = run_job(pod_stack, runner, "x = bytearray(2 * 1024 ** 3)\n", "python")
    assert outcome.status is JobStatus.MEMORY_LIMIT, outcome


def test_processes_that_together_pass_the_pods_memory_are_killed_by_its_cgroup(
    pod_stack: Cluster, runner: PodRunner
) -> None:
    # Each below the per-process limit (256 MiB), together beyond the Pod's 544 MiB: the cgroup's OOM killer.
    hog = "python3 -c 'import time; x = b\"x\" * (200 * 1024 * 1024); time.sleep(8)'"
    code = "\n".join([f"{hog} &"] * 4 + ["wait"]) + "\n"
    outcome = run_job(pod_stack, runner, code, "bash")
    assert outcome.status is JobStatus.MEMORY_LIMIT, outcome


def test_an_endless_loop_is_contained(pod_stack: Cluster, runner: PodRunner) -> None:
    outcome = run_job(pod_stack, runner, "while True:\n    pass\n", "python")
    assert outcome.status is JobStatus.TIMEOUT, outcome


def test_a_network_call_is_contained(pod_stack: Cluster, runner: PodRunner) -> None:
    service = pod_stack.json("get", "service", f"{STACK}-postgres", "-n", NAMESPACE)["spec"]["clusterIP"]
    code = f"import socket\nsocket.create_connection(('{service}', 5432), timeout=3)\nprint('connected')\n"
    outcome = run_job(pod_stack, runner, code, "python")
    assert outcome.status is JobStatus.RUNTIME_ERROR, outcome
    assert "connected" not in outcome.stdout
    # and the NetworkPolicy that denies job Pods everything is there
    policy = pod_stack.json("get", "networkpolicy", f"{STACK}-genesis-jobs", "-n", NAMESPACE)["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"] and not policy.get("egress")


def test_an_ordinary_job_in_pod_mode(pod_stack: Cluster, runner: PodRunner) -> None:
    outcome = run_job(pod_stack, runner, "import os\nprint('hello from a job Pod')\n", "python")
    assert outcome.status is JobStatus.OK and outcome.stdout == "hello from a job Pod\n", outcome
    assert any("F401" in finding for finding in outcome.lint)


def test_a_jobs_latency_in_each_mode(pod_stack: Cluster, runner: PodRunner) -> None:
    """The median of a few trivial python jobs (syntax, lint, run): each in a job Pod on the node, and in
    bubblewrap as Genesis runs them in that mode (JobRunner, here on the node's host); printed in the timings."""
    code = "print('hello')\n"

    def median(run: Callable[[], JobOutcome], rounds: int = 5) -> float:
        took = []
        for _ in range(rounds):
            started = time.monotonic()
            outcome = run()
            took.append(time.monotonic() - started)
            assert outcome.status is JobStatus.OK and outcome.stdout == "hello\n", outcome
        return statistics.median(took)

    pod = median(lambda: asyncio.run(runner.run(code, "python")))
    bubblewrap = median(lambda: asyncio.run(JobRunner(1).run(code, "python")))
    TIMINGS["genesis python job, sandbox pod (median of 5)"] = pod
    TIMINGS["genesis python job, bubblewrap (median of 5)"] = bubblewrap
    assert not job_pods(pod_stack)


def as_reachable(url: str, host: str, port: int) -> str:
    """A stack's database URL (Service DNS names) as the host reaches the Service."""
    return psycopg.conninfo.make_conninfo(url, host=host, port=str(port), connect_timeout="10")


@pytest.mark.parametrize(
    ("language", "code", "status"),
    [
        ("bash", ":(){ :|:& };:\nsleep 60\n", JobStatus.TIMEOUT),
        ("python", "x = bytearray(2 * 1024 ** 3)\n", JobStatus.MEMORY_LIMIT),
        ("python", "while True:\n    pass\n", JobStatus.TIMEOUT),
        ("python", "import socket\nsocket.create_connection(('1.1.1.1', 443), timeout=3)\n", JobStatus.RUNTIME_ERROR),
    ],
    ids=["fork bomb", "memory hog", "endless loop", "network call"],
)
def test_the_live_genesis_answers_a_hostile_job_sent_as_an_instance(
    pod_stack: Cluster, language: str, code: str, status: JobStatus
) -> None:
    """Through the live system: the job request sent on the shared queue as Singularity instance 1 (its own
    role), answered by Genesis in its Pod, which ran the job in a job Pod; the answer is read in Genesis's
    database (the row it writes with each reply), and no job Pod is left."""
    cluster = pod_stack
    request = c.JobRequest(reply_to="singularity_1", agent_id="e2e", code=code, language=language, run=True)
    with cluster.service_address(NAMESPACE, f"{STACK}-postgres", 5432) as (host, port):
        sender = secret_value(cluster, f"{STACK}-singularity-1-db", "SHARED_QUEUE_DB_URL")

        async def send() -> None:
            queue = SharedQueue(as_reachable(sender, host, port), max_size=1, name="e2e-singularity-1")
            await queue.open()
            try:
                await queue.publish(request)
            finally:
                await queue.close()

        asyncio.run(send())
        genesis_db = as_reachable(secret_value(cluster, f"{STACK}-genesis-db", "DATABASE_URL"), host, port)

        def answered() -> tuple | None:
            with psycopg.connect(genesis_db) as conn:
                query = "SELECT status, instance FROM executions WHERE request_id = %s"
                return conn.execute(query, (request.request_id,)).fetchone()

        row = wait_until("Genesis's answer", answered, 180)
    assert row == (status.value, "singularity_1"), row
    wait_until("no job Pod left", lambda: not job_pods(cluster), 60)

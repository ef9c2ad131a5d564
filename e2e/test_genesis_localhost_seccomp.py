"""On a real node: Genesis in bubblewrap mode under the chart's `Localhost` seccomp profile, not `Unconfined`.

The local node installs charts/singularity-stack/files/genesis-bubblewrap-seccomp.json where its kubelet reads
Localhost profiles (as the README tells an operator to on each node). A stack names it; then:

- Genesis's container runs under a seccomp filter, seen from the host (/proc/<pid>/status `Seccomp: 2`);
- a job run exactly as Genesis runs it, inside that container, meets the chart's profile: a call the profile
  denies (and the jobs' own filter allows) fails with the profile's errno, and succeeds on the host, unconfined;
  and bubblewrap itself works (the runtime default would refuse its user namespaces);
- through the live system, an ordinary job is OK and a fork bomb is still contained.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import pytest

from singularity_stack import contract as c
from singularity_stack.contract import JobStatus
from singularity_stack.genesis import seccomp as job_seccomp
from singularity_stack.genesis.runner import JobOutcome
from singularity_stack.sharedqueue import SharedQueue
from singularity_stack_testing.cluster import Cluster, wait_until
from singularity_stack_testing.kube.localnode import SECCOMP_PROFILE
from singularity_stack_testing.manifests import LOCALHOST_PROFILE
from singularity_stack_testing.seccomp_profile import PROFILE_FILE
from singularity_stack_testing.stacks import NAMESPACE, OTHER_PODS, example, stack_pods, wait_ready

pytestmark = pytest.mark.timeout(1200)
STACK = "seccomp"
LOCALHOST = {"type": "Localhost", "localhostProfile": SECCOMP_PROFILE}
# personality(ADDR_NO_RANDOMIZE): harmless, allowed to anyone unconfined and by the jobs' own filter
# (seccomp.py), refused by the runtime default and so by the chart's profile, which allows personality only
# for a few other personas. (The jobs' filter also refuses keyctl, clone3, ...: those could not tell.)
SYS_PERSONALITY, ADDR_NO_RANDOMIZE = 135, 0x0040000  # x86_64
PROBE = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
result = libc.syscall({SYS_PERSONALITY}, {ADDR_NO_RANDOMIZE})
print(result, ctypes.get_errno())
"""
# Genesis's own JobRunner, inside its container: the job's phases in bubblewrap, as Genesis runs a request.
RUN_AS_GENESIS = (
    "import asyncio, sys\n"
    "from singularity_stack.genesis.runner import JobRunner\n"
    "print(asyncio.run(JobRunner(1).run(sys.stdin.read(), 'python')).model_dump_json())\n"
)


def probe_result(stdout: str) -> tuple[int, int]:
    """(the call's result, errno) from the probe's output."""
    result, code = stdout.split()
    return int(result), int(code)


def personality_errno(profile: dict[str, Any], persona: int) -> int | None:
    """The errno the profile answers personality(persona) with, or None where it allows it."""
    for rule in profile["syscalls"]:
        if "personality" in rule["names"]:
            args = rule.get("args") or []
            if not args or all(a["op"] == "SCMP_CMP_EQ" and a["index"] == 0 and a["value"] == persona for a in args):
                return None if rule["action"] == "SCMP_ACT_ALLOW" else int(rule.get("errnoRet", errno.EPERM))
    return int(profile["defaultErrnoRet"]) if profile["defaultAction"] == "SCMP_ACT_ERRNO" else None


def genesis_pod(cluster: Cluster) -> dict[str, Any]:
    [pod] = [
        p
        for p in stack_pods(cluster, STACK)
        if p["metadata"]["labels"]["app.kubernetes.io/component"] == "genesis"
        and not p["metadata"].get("deletionTimestamp")
    ]
    return pod


def container_pids(container_id: str) -> list[int]:
    """The host's pids of a container's processes: those whose cgroup is the container's (cgroupfs driver)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if container_id in (entry / "cgroup").read_text():
                    pids.append(int(entry.name))
            except OSError:
                continue  # the process ended meanwhile
    return pids


def seccomp_mode(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp:"):
            return line.split()[1]
    raise AssertionError(f"no Seccomp line in /proc/{pid}/status")


def secret_value(cluster: Cluster, name: str, key: str) -> str:
    return base64.b64decode(cluster.json("get", "secret", name, "-n", NAMESPACE)["data"][key]).decode()


def as_reachable(url: str, host: str, port: int) -> str:
    return psycopg.conninfo.make_conninfo(url, host=host, port=str(port), connect_timeout="10")


@pytest.fixture(scope="module")
def seccomp_stack(operator_installed: Cluster) -> Iterator[Cluster]:
    cluster = operator_installed
    if cluster.provider != "local":
        pytest.skip("the chart's Localhost profile is installed on the local node only (kind's nodes: by hand)")
    stack = example(name=STACK, deletion_policy="Delete")
    stack["spec"].setdefault("genesis", {}).update({"sandbox": "bubblewrap", "seccompProfile": LOCALHOST})
    cluster.apply(stack)
    wait_ready(cluster, STACK, OTHER_PODS + 1)
    yield cluster
    cluster.kubectl("delete", "singularitystack", STACK, "-n", NAMESPACE, "--wait=false")


def test_the_stack_names_the_charts_profile_as_the_readme_installs_it(seccomp_stack: Cluster) -> None:
    assert SECCOMP_PROFILE == LOCALHOST_PROFILE
    container = genesis_pod(seccomp_stack)["spec"]["containers"][0]
    assert container["securityContext"]["seccompProfile"] == LOCALHOST


def test_genesis_runs_under_a_seccomp_filter_seen_from_the_host(seccomp_stack: Cluster) -> None:
    status = genesis_pod(seccomp_stack)["status"]["containerStatuses"][0]
    assert status["ready"], status
    container_id = status["containerID"].removeprefix("containerd://")
    pids = container_pids(container_id)
    assert pids, f"no process of container {container_id} on the host"
    assert {pid: seccomp_mode(pid) for pid in pids} == dict.fromkeys(pids, "2")  # 2: SECCOMP_MODE_FILTER
    assert seccomp_mode(os.getpid()) == "0"  # the host's own processes are not filtered: the check can tell


def test_a_job_in_genesis_meets_the_charts_profile(seccomp_stack: Cluster) -> None:
    assert personality_errno(json.loads(PROFILE_FILE.read_text()), ADDR_NO_RANDOMIZE) == errno.EPERM
    assert "personality" not in job_seccomp.DENIED and "personality" not in job_seccomp.NAMESPACE_CALLS
    pod = genesis_pod(seccomp_stack)["metadata"]["name"]
    argv = ["exec", "-i", "-n", NAMESPACE, pod, "-c", "genesis", "--", "python3", "-c", RUN_AS_GENESIS]
    outcome = JobOutcome.model_validate_json(seccomp_stack.kubectl(*argv, stdin=PROBE).strip().splitlines()[-1])
    # It ran: bubblewrap's user, mount and pid namespaces, which the runtime default refuses, were allowed.
    assert outcome.status is JobStatus.OK, outcome
    assert probe_result(outcome.stdout) == (-1, errno.EPERM), outcome
    # The same call on the host (no filter) succeeds: what refused it was the profile.
    assert asyncio.run(_host_probe()) == (0, 0)


async def _host_probe() -> tuple[int, int]:
    process = await asyncio.create_subprocess_exec(
        "python3", "-c", PROBE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr
    return probe_result(stdout.decode())


@pytest.mark.parametrize(
    ("language", "code", "status"),
    [
        ("python", "print('hello under the Localhost profile')\n", JobStatus.OK),
        ("bash", ":(){ :|:& };:\nsleep 60\n", JobStatus.TIMEOUT),
    ],
    ids=["ordinary job", "fork bomb"],
)
def test_the_live_genesis_answers_jobs_under_the_profile(
    seccomp_stack: Cluster, language: str, code: str, status: JobStatus
) -> None:
    """Sent on the shared queue as Singularity instance 1 (its own role); Genesis's answer read in its database."""
    cluster = seccomp_stack
    request = c.JobRequest(reply_to="singularity_1", agent_id="e2e", code=code, language=language, run=True)
    with cluster.service_address(NAMESPACE, f"{STACK}-postgres", 5432) as (host, port):
        sender = as_reachable(secret_value(cluster, f"{STACK}-singularity-1-db", "SHARED_QUEUE_DB_URL"), host, port)

        async def send() -> None:
            async with SharedQueue(sender, max_size=1, name="e2e-singularity-1") as queue:
                await queue.publish(request)

        asyncio.run(send())
        genesis_db = as_reachable(secret_value(cluster, f"{STACK}-genesis-db", "DATABASE_URL"), host, port)

        def answered() -> tuple[Any, ...] | None:
            with psycopg.connect(genesis_db) as conn:
                query = "SELECT status, instance FROM executions WHERE request_id = %s"
                return conn.execute(query, (request.request_id,)).fetchone()

        row = wait_until("Genesis's answer", answered, 180)
    assert row == (status.value, "singularity_1"), row

"""Genesis's `sandbox: pod`: the job Pod's manifest (pure), and its entry running real jobs' phases.

The manifest is checked against the Pod Security Standards' controls (test_pod_security.py's table): it
passes restricted, carries no token, the job's limits as resources, the wall clock as activeDeadlineSeconds.
The entry (pod_entry.py) runs here as a process with the environment the manifest gives it (not as a Pod's
pid 1: that is the e2e suite's), and its frames are read by the same code that reads a Pod's log, so the
statuses are the ones the requester gets.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_pod_security import violations

from singularity_stack.contract import JobStatus
from singularity_stack.genesis import pod_sandbox
from singularity_stack.genesis.languages import get_language
from singularity_stack.genesis.pod_entry import CODE_ENV, SPEC_ENV
from singularity_stack.genesis.pod_sandbox import (
    PodEnd,
    PodRunner,
    PodSandboxSettings,
    job_outcome,
    job_phases,
    job_pod_manifest,
    parse_frames,
    pod_end,
)
from singularity_stack.genesis.sandbox import KiB, Limits, MiB

LIMITS = Limits(wall_time_s=4, cpu_time_s=2)


def manifest(code: str = "print(1)\n", language: str = "python", run: bool = True, **extra: Any) -> dict[str, Any]:
    lang = get_language(language)
    phases = job_phases(lang, LIMITS, run)
    return job_pod_manifest(
        name="genesis-job-x",
        namespace="team",
        image="registry.example/stack:1",
        code=code,
        language=lang,
        phases=phases,
        limits=LIMITS,
        nonce="n" * 32,
        uid=123456,
        labels={"app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": "genesis-job"},
        **extra,
    )


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}


# -- the manifest -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime_class", ["", "gvisor"])
def test_the_job_pod_passes_restricted(runtime_class: str):
    pod = manifest(runtime_class=runtime_class)
    assert violations(pod) == {}
    assert pod["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"].get("runtimeClassName", "") == runtime_class


def test_the_job_pod_has_no_token_no_links_a_read_only_root_and_no_restart():
    pod = manifest()
    spec = pod["spec"]
    [container] = spec["containers"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsUser"] == 123456 != 0
    # the only writable place is the job's memory-backed workdir (also its /tmp), no larger than in bubblewrap
    assert spec["volumes"] == [{"name": "box", "emptyDir": {"medium": "Memory", "sizeLimit": "32Mi"}}]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/box", "/tmp"}
    assert "serviceAccountName" not in spec and "hostNetwork" not in spec


def test_the_job_limits_are_the_containers_resources_and_the_deadline():
    pod = manifest()
    [container] = pod["spec"]["containers"]
    # the whole job's memory (512 MiB) and its workdir's (32 MiB, memory-backed), one CPU
    assert container["resources"]["limits"] == {"cpu": "1000m", "memory": "544Mi"}
    # three phases of 4 s each and the Pod's start
    assert pod["spec"]["activeDeadlineSeconds"] == 3 * 4 + pod_sandbox.STARTUP_ALLOWANCE_S
    spec = json.loads(env_of(pod)[SPEC_ENV])
    assert spec["limits"]["max_processes"] == 64 and spec["limits"]["memory_bytes"] == 256 * MiB
    assert [p["name"] for p in spec["phases"]] == ["syntax", "lint", "run"]
    assert [p["name"] for p in json.loads(env_of(manifest(run=False))[SPEC_ENV])["phases"]] == ["syntax", "lint"]


def test_the_owner_is_the_genesis_pod():
    pod = manifest(owner=("demo-genesis-abc", "uid-1"))
    assert pod["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "demo-genesis-abc", "uid": "uid-1"}
    ]


def test_settings_label_job_pods_for_the_network_policy_and_the_sweep():
    settings = PodSandboxSettings(job_labels="app.kubernetes.io/instance=demo, x=y", pod_name="demo-genesis-1")
    assert settings.labels() == {
        "app.kubernetes.io/instance": "demo",
        "x": "y",
        "app.kubernetes.io/component": "genesis-job",
        pod_sandbox.OWNER_LABEL: "demo-genesis-1",
    }
    runner = PodRunner(None, settings.model_copy(update={"job_namespace": "team"}))
    assert runner.selector() == f"app.kubernetes.io/component=genesis-job,{pod_sandbox.OWNER_LABEL}=demo-genesis-1"


async def test_a_source_too_large_for_a_pod_is_refused_as_invalid_input_without_a_pod():
    runner = PodRunner(None, PodSandboxSettings(job_namespace="team"))  # no API: nothing may be created
    outcome = await runner.run("#" * (pod_sandbox.MAX_POD_SOURCE_BYTES + 1), "python")
    assert outcome.status is JobStatus.SYNTAX_ERROR
    assert f"the limit is {pod_sandbox.MAX_POD_SOURCE_BYTES} bytes" in outcome.stderr


# -- how a Pod ended ------------------------------------------------------------------------------------------


def test_pod_end_reads_kubernetes_reasons():
    assert pod_end({"status": {"phase": "Running"}}) is None
    deadline = pod_end({"status": {"phase": "Failed", "reason": "DeadlineExceeded"}})
    assert deadline is not None and deadline.deadline_exceeded
    oom = {
        "phase": "Failed",
        "containerStatuses": [{"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}],
    }
    end = pod_end({"status": oom})
    assert end is not None and end.oom_killed and end.exit_code == 137
    waiting = {"phase": "Pending", "containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull"}}}]}
    with pytest.raises(pod_sandbox.SandboxError, match="ErrImagePull"):
        pod_end({"status": waiting})


def test_a_phase_the_pod_ended_reports_the_pods_reason():
    lang = get_language("bash")
    phases = job_phases(lang, LIMITS, True)
    ok = {"name": "syntax", "exit_code": 0, "stdout": "", "stderr": "", "elapsed_ms": 1.0}
    lint = {"name": "lint", "exit_code": 0, "stdout": "eyJjb21tZW50cyI6IFtdfQ==", "stderr": ""}  # {"comments": []}
    frames = parse_frames("".join(f"\nN {json.dumps(f)}\n" for f in (ok, lint)), "N", phases)
    assert [f.name for f in frames] == ["syntax", "lint"]
    timeout = job_outcome(lang, phases, frames, PodEnd("Failed", "DeadlineExceeded"), LIMITS, 1.0)
    assert timeout.status is JobStatus.TIMEOUT
    oom = job_outcome(lang, phases, frames, PodEnd("Failed", "OOMKilled", 137), LIMITS, 1.0)
    assert oom.status is JobStatus.MEMORY_LIMIT
    # an entry that never reported (a broken image) is a sandbox failure, never the job's syntax error
    with pytest.raises(pod_sandbox.SandboxError, match="without reporting its syntax phase"):
        job_outcome(lang, phases, [], PodEnd("Failed", "Error", 1), LIMITS, 1.0)


def test_frames_are_taken_in_phase_order_first_one_each():
    lang = get_language("bash")
    phases = job_phases(lang, LIMITS, True)
    text = "".join(
        f"\nN {json.dumps({'name': name, 'exit_code': code})}\n"
        for name, code in (("run", 0), ("syntax", 0), ("syntax", 5), ("lint", 0), ("run", 3), ("run", 0))
    )
    frames = parse_frames(text, "N", phases)
    assert [(f.name, f.exit_code) for f in frames] == [("syntax", 0), ("lint", 0), ("run", 3)]


# -- the entry, running real phases ------------------------------------------------------------------------


def run_entry(
    tmp_path: Path, code: str, language: str, run: bool = True, limits: Limits = LIMITS, as_init: bool = False
) -> Any:
    """The entry as the job Pod's container starts it (its environment from the manifest), here; `as_init`:
    as pid 1 of a pid namespace of its own, as in the Pod (needs root)."""
    lang = get_language(language)
    phases = job_phases(lang, limits, run)
    pod = job_pod_manifest(
        name="j",
        namespace="n",
        image="i",
        code=code,
        language=lang,
        phases=phases,
        limits=limits,
        nonce="a" * 32,
        uid=1,
        labels={},
    )
    env = env_of(pod)
    spec = json.loads(env[SPEC_ENV])
    spec["workdir"] = str(tmp_path)
    init = ["unshare", "--pid", "--fork", "--kill-child"] if as_init else []
    entry = [*init, sys.executable, *pod_sandbox.ENTRY[2:]]
    assert pod["spec"]["containers"][0]["command"][1:] == list(pod_sandbox.ENTRY[1:])
    done = subprocess.run(
        entry,
        env={"PATH": os.environ["PATH"], SPEC_ENV: json.dumps(spec), CODE_ENV: env[CODE_ENV]},
        capture_output=True,
        timeout=60,
        check=True,
    )
    frames = parse_frames("\n" + done.stdout.decode(), "a" * 32, phases)
    return job_outcome(lang, phases, frames, PodEnd("Succeeded", "Completed", 0), limits, 1.0)


def test_a_python_job_runs_with_its_lint(tmp_path: Path):
    outcome = run_entry(tmp_path, "import os\nprint('hi')\n", "python")
    assert outcome.status is JobStatus.OK, outcome
    assert outcome.stdout == "hi\n" and outcome.exit_code == 0
    assert any("F401" in finding for finding in outcome.lint)
    assert set(outcome.timings_ms) == {"syntax", "lint", "run", "total"}


def test_a_syntax_error_stops_the_job_before_it_runs(tmp_path: Path):
    outcome = run_entry(tmp_path, "print('ran')\ndef (:\n", "python")
    assert outcome.status is JobStatus.SYNTAX_ERROR
    assert "SyntaxError" in outcome.stderr and "ran" not in outcome.stdout
    assert "run" not in outcome.timings_ms


def test_lint_only(tmp_path: Path):
    assert run_entry(tmp_path, "echo hi\n", "bash", run=False).status is JobStatus.OK
    findings = run_entry(tmp_path, "echo $1\n", "bash", run=False)
    assert findings.status is JobStatus.LINT and findings.lint


def test_runtime_error_exit_code_and_stderr(tmp_path: Path):
    outcome = run_entry(tmp_path, "echo oops >&2\nexit 3\n", "bash")
    assert outcome.status is JobStatus.RUNTIME_ERROR
    assert outcome.exit_code == 3 and outcome.stderr == "oops\n"


def test_an_endless_loop_times_out(tmp_path: Path):
    outcome = run_entry(tmp_path, "while True:\n    pass\n", "python", limits=Limits(wall_time_s=2, cpu_time_s=1))
    assert outcome.status is JobStatus.TIMEOUT


def test_a_sleeping_job_times_out_on_the_wall_clock(tmp_path: Path):
    outcome = run_entry(tmp_path, "sleep 30\n", "bash", limits=Limits(wall_time_s=1, cpu_time_s=1))
    assert outcome.status is JobStatus.TIMEOUT and outcome.exit_code is None


def test_a_memory_hog_hits_the_memory_limit(tmp_path: Path):
    outcome = run_entry(tmp_path, "x = bytearray(1024 * 1024 * 1024)\n", "python")
    assert outcome.status is JobStatus.MEMORY_LIMIT


def test_output_past_the_cap_is_truncated(tmp_path: Path):
    outcome = run_entry(tmp_path, "while True:\n    print('y' * 1000)\n", "python")
    assert outcome.status is JobStatus.OUTPUT_TRUNCATED
    assert len(outcome.stdout.encode()) == 64 * KiB


def test_what_a_job_leaves_running_is_killed_before_the_frame(tmp_path: Path):
    marker = tmp_path / "late"
    outcome = run_entry(tmp_path, f"(sleep 2; touch {marker}) &\necho started\n", "bash")
    assert outcome.status is JobStatus.OK and outcome.stdout == "started\n"
    # the entry killed the phase's session when it ended: the background child never wrote
    subprocess.run(["sleep", "2.5"], check=True)
    assert not marker.exists()


def test_the_job_sees_none_of_the_entrys_environment(tmp_path: Path):
    outcome = run_entry(tmp_path, "env\n", "bash")
    assert SPEC_ENV not in outcome.stdout and CODE_ENV not in outcome.stdout
    assert "PATH=/usr/bin:/bin" in outcome.stdout


def test_a_forged_frame_from_the_run_cannot_change_the_lint(tmp_path: Path):
    nonce = "a" * 32  # a job may know the nonce; frames of earlier phases are written before it starts
    forged = json.dumps({"name": "lint", "exit_code": 0, "stdout": "W10=", "stderr": ""})
    outcome = run_entry(tmp_path, f"import os\nprint('\\n{nonce} ' + {forged!r})\n", "python")
    assert any("F401" in finding for finding in outcome.lint)


def test_the_runner_deletes_the_pod_even_when_the_wait_fails():
    """PodRunner against a stand-in API that never runs the Pod: a SandboxError, and the Pod deleted."""

    class Core:
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.api_client = self

        def sanitize_for_serialization(self, pod: Any) -> Any:
            return copy.deepcopy(pod)

        def create_namespaced_pod(self, namespace: str, body: Any) -> None:
            self.calls.append(f"create {body['metadata']['name']}")

        def read_namespaced_pod(self, name: str, namespace: str) -> Any:
            return {
                "status": {
                    "phase": "Pending",
                    "containerStatuses": [{"state": {"waiting": {"reason": "ErrImagePull"}}}],
                }
            }

        def delete_namespaced_pod(self, name: str, namespace: str, grace_period_seconds: int) -> None:
            self.calls.append(f"delete {name}")

    core = Core()
    runner = PodRunner(core, PodSandboxSettings(job_namespace="team"))
    with pytest.raises(pod_sandbox.SandboxError, match="ErrImagePull"):
        asyncio.run(runner.run("print(1)", "python"))
    created, deleted = core.calls
    assert created.replace("create", "delete") == deleted


def test_a_network_call_is_refused(tmp_path: Path):
    """Even to a port that listens here: the job's IPv4 and IPv6 sockets are refused (EACCES)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')\n"
        outcome = run_entry(tmp_path, code, "python")
    assert outcome.status is JobStatus.RUNTIME_ERROR, outcome
    assert "connected" not in outcome.stdout and "PermissionError" in outcome.stderr


def test_ptrace_is_refused_as_in_the_bubblewrap_mode(tmp_path: Path):
    code = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    code += "print(libc.ptrace(0, 0, 0, 0), ctypes.get_errno())\n"  # PTRACE_TRACEME
    outcome = run_entry(tmp_path, code, "python")
    assert outcome.stdout == "-1 1\n", outcome  # EPERM


@pytest.mark.parametrize(
    ("language", "code"),
    [("javascript", "console.log('hi from node')\n"), ("elixir", 'IO.puts("hi from elixir")\n')],
)
def test_node_and_elixir_run_under_the_filters(tmp_path: Path, language: str, code: str):
    outcome = run_entry(tmp_path, code, language, limits=Limits(wall_time_s=10, cpu_time_s=5))
    assert outcome.status is JobStatus.OK, outcome
    assert outcome.stdout.startswith("hi from")


@pytest.mark.skipif(os.geteuid() != 0, reason="NEEDS ROOT: the entry as pid 1 of its own pid namespace (unshare)")
def test_a_job_cannot_interrupt_or_kill_the_entry_it_runs_under(tmp_path: Path):
    """The entry is the Pod's init: a job of its uid signalling pid 1 (SIGINT, which Python would handle,
    SIGTERM, SIGKILL) changes nothing, and the job's own result is what comes back."""
    code = (
        "import os, signal\n"
        "for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):\n"
        "    os.kill(1, sig)\n"
        "print('still reported')\n"
    )
    outcome = run_entry(tmp_path, code, "python", as_init=True)
    assert outcome.status is JobStatus.OK, outcome
    assert outcome.stdout == "still reported\n"


# -- on a real API server (no kubelet: job Pods stay Pending): cancellation, a Pod gone mid-wait -----------


@pytest.fixture
def job_namespace(kube) -> Any:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kube.kubeconfig))
    core = client.CoreV1Api(api)
    name = f"pod-sandbox-{os.getpid()}-{len(core.list_namespace().items)}"
    core.create_namespace({"metadata": {"name": name}})
    yield core, name
    core.delete_namespace(name)


def pods_in(core: Any, namespace: str) -> list[str]:
    return [p.metadata.name for p in core.list_namespaced_pod(namespace).items]


async def wait_until(check: Any, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


class HeldCreate:
    """The real API client, except that creating a Pod waits in its thread until `release` is set (so a
    cancel can arrive while the create is in flight), then reaches the real API server."""

    def __init__(self, core: Any) -> None:
        import threading

        self.core = core
        self.api_client = core.api_client
        self.entered, self.release, self.answered = threading.Event(), threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.core, name)

    def create_namespaced_pod(self, namespace: str, body: Any) -> Any:
        self.entered.set()
        self.release.wait(10)
        try:
            return self.core.create_namespaced_pod(namespace, body)
        finally:
            self.answered.set()


async def test_a_job_cancelled_while_its_pod_is_created_leaves_no_pod(job_namespace):
    """The create call is held in its thread until the job has been cancelled; it then reaches the real API
    server, which makes the Pod: PodRunner waits for that answer and deletes it."""
    core, namespace = job_namespace
    held = HeldCreate(core)
    entered, release, answered = held.entered, held.release, held.answered
    runner = PodRunner(held, PodSandboxSettings(job_namespace=namespace))
    job = asyncio.ensure_future(runner.run("print(1)\n", "python"))
    await asyncio.to_thread(entered.wait, 10)
    job.cancel()
    await asyncio.sleep(0.1)  # the cancel is delivered while the create is still in flight
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await job
    await asyncio.to_thread(answered.wait, 10)
    assert answered.is_set()
    await wait_until(lambda: not runner._cleanups)
    assert pods_in(core, namespace) == []


async def test_a_second_cancel_during_the_cleanup_still_deletes_the_pod(job_namespace):
    core, namespace = job_namespace
    held = HeldCreate(core)
    entered, release, answered = held.entered, held.release, held.answered
    runner = PodRunner(held, PodSandboxSettings(job_namespace=namespace))
    job = asyncio.ensure_future(runner.run("print(1)\n", "python"))
    await asyncio.to_thread(entered.wait, 10)
    job.cancel()
    await asyncio.sleep(0.1)
    job.cancel()  # again, while the job waits for the create's answer to delete the Pod
    await asyncio.sleep(0.1)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await job
    await asyncio.to_thread(answered.wait, 10)
    assert answered.is_set()
    await wait_until(lambda: not runner._cleanups)
    assert pods_in(core, namespace) == []


async def test_a_job_cancelled_while_its_pod_waits_leaves_no_pod(job_namespace):
    core, namespace = job_namespace
    runner = PodRunner(core, PodSandboxSettings(job_namespace=namespace))
    job = asyncio.ensure_future(runner.run("print(1)\n", "python"))
    await wait_until(lambda: pods_in(core, namespace) != [])
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert pods_in(core, namespace) == []


async def test_a_pod_deleted_by_someone_else_mid_wait_is_a_sandbox_error(job_namespace):
    """The API server answers 404 to the wait's read: a SandboxError naming the Pod and the API server's
    words (the service turns it into the job's `error`), never a raw ApiException."""
    core, namespace = job_namespace
    runner = PodRunner(core, PodSandboxSettings(job_namespace=namespace))
    job = asyncio.ensure_future(runner.run("print(1)\n", "python"))
    await wait_until(lambda: pods_in(core, namespace) != [])
    [name] = pods_in(core, namespace)
    core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    with pytest.raises(pod_sandbox.SandboxError) as failed:
        await asyncio.wait_for(job, 10)
    assert str(failed.value) == f'could not read the job Pod {name} while it ran: pods "{name}" not found'


# -- the output caps and the Pod's log ---------------------------------------------------------------------


def test_output_caps_whose_frames_pass_the_log_read_are_refused_naming_the_largest():
    largest = pod_sandbox.largest_output_cap()
    assert pod_sandbox.log_bytes_needed(largest) <= pod_sandbox.POD_LOG_READ_BYTES
    assert pod_sandbox.log_bytes_needed(largest + 3) > pod_sandbox.POD_LOG_READ_BYTES
    PodRunner(None, PodSandboxSettings(job_namespace="team"), limits=Limits(max_output_bytes=largest))
    with pytest.raises(ValueError) as refused:
        PodRunner(None, PodSandboxSettings(job_namespace="team"), limits=Limits(max_output_bytes=largest + 3))
    assert f"Limits.max_output_bytes={largest + 3} is too large for sandbox: pod" in str(refused.value)
    assert f"more than the {pod_sandbox.POD_LOG_READ_BYTES} bytes Genesis reads; at most {largest}" in str(
        refused.value
    )
    # the default cap is far below
    assert pod_sandbox.log_bytes_needed(Limits().max_output_bytes) < pod_sandbox.POD_LOG_READ_BYTES // 4


def test_at_the_largest_cap_every_phases_frame_fits_the_log_read_and_truncation_is_reported(tmp_path: Path):
    """The entry's real log with stdout and stderr past the largest cap: within what Genesis reads, the
    output cut at the cap, output_truncated set."""
    cap = pod_sandbox.largest_output_cap()
    limits = Limits(wall_time_s=10, cpu_time_s=5, max_output_bytes=cap)
    code = f"import sys\nsys.stdout.write('o' * {cap})\nsys.stdout.flush()\nsys.stderr.write('e' * {cap + 10})\n"
    lang = get_language("python")
    phases = job_phases(lang, limits, True)
    pod = job_pod_manifest(
        name="j", namespace="n", image="i", code=code, language=lang, phases=phases, limits=limits,
        nonce="a" * 32, uid=1, labels={},
    )  # fmt: skip
    env = env_of(pod)
    spec = json.loads(env[SPEC_ENV])
    spec["workdir"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, *pod_sandbox.ENTRY[2:]],
        env={"PATH": os.environ["PATH"], SPEC_ENV: json.dumps(spec), CODE_ENV: env[CODE_ENV]},
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert len(done.stdout) <= pod_sandbox.POD_LOG_READ_BYTES
    log_read = done.stdout[: pod_sandbox.POD_LOG_READ_BYTES].decode()  # what read_namespaced_pod_log returns
    frames = parse_frames("\n" + log_read, "a" * 32, phases)
    outcome = job_outcome(lang, phases, frames, PodEnd("Succeeded", "Completed", 0), limits, 1.0)
    assert outcome.status is JobStatus.OUTPUT_TRUNCATED, outcome.status
    assert (outcome.stdout, outcome.stderr) == ("o" * cap, "e" * cap)

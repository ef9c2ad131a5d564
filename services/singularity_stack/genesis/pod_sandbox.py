"""`GENESIS_SANDBOX=pod`: each job in its own short-lived Pod, which passes the restricted Pod Security Standard.

Where bubblewrap cannot run (a cluster enforcing `restricted`, no user namespaces), Kubernetes is the
sandbox: PodRunner has JobRunner's interface and result, and runs each job as one Pod (job_pod_manifest,
pure) of the job image, whose entry (pod_entry.py, the container's pid 1) runs the phases (syntax check,
lint, run: languages.py's commands) in order under the same per-process rlimits and reports each in a frame
on stdout; Genesis reads the frames from the Pod's log and applies its caps. What holds the job:
- the Pod: no service-account token, a fresh uid per job (so RLIMIT_NPROC counts that job's processes
  alone), read-only root filesystem, all capabilities dropped, no privilege escalation, seccomp
  RuntimeDefault, `runtimeClassName` when set (gVisor, Kata), `enableServiceLinks: false`;
- its container's resources (memory and CPU: the job's cgroup) and `activeDeadlineSeconds` (the wall clock
  of all its phases, the entry bounding each phase's too);
- the network: a NetworkPolicy of the operator denies job Pods all ingress and egress (the label
  app.kubernetes.io/component=genesis-job; it needs a CNI that enforces NetworkPolicies), and the entry's
  seccomp filters refuse the job IPv4 and IPv6 sockets wherever it runs (pod_entry.py);
- afterwards the Pod is deleted, also when the job is cancelled while the Pod is being created (the
  deletion waits for the create's answer, and a second cancel does not stop it); job Pods a previous run
  of this Genesis Pod left are deleted at start, and each has the Genesis Pod as its owner, so the garbage
  collector removes them when that Pod goes.
The API server's refusals and failures (creating, reading the Pod while it runs) are SandboxErrors: the
job's `error`, with the reason. The frames of every phase at the output caps must fit in the part of the
Pod's log Genesis reads (POD_LOG_READ_BYTES): PodRunner refuses larger caps, naming the largest.
The source travels base64-encoded in an environment variable of the Pod, so it is bounded
(`MAX_POD_SOURCE_BYTES`; larger sources are refused as in the bubblewrap mode, as invalid input).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from singularity_stack.contract import JobStatus
from singularity_stack.genesis.languages import LintOutputError, Toolchain, get_language
from singularity_stack.genesis.pod_entry import CODE_ENV, SPEC_ENV, TOOL_PREFIX
from singularity_stack.genesis.runner import JobOutcome, classify
from singularity_stack.genesis.sandbox import WORKDIR, Limits, SandboxError, SandboxResult

log = logging.getLogger(__name__)

MAX_POD_SOURCE_BYTES = 64 * 1024  # base64 in one environment variable: below the kernel's 128 KiB per string
STARTUP_ALLOWANCE_S = 30  # of activeDeadlineSeconds, for the Pod's start before its first phase
JOB_COMPONENT = "genesis-job"
OWNER_LABEL = "singularity.dev/genesis-owner"  # the Genesis Pod whose job this is
JOB_CONTAINER = "job"
JOB_UID_RANGE = (100_000, 2_000_000_000)  # a uid per job, used by nothing else on the node
ENTRY = ("/opt/singularity/bin/python3", "-I", "-m", "singularity_stack.genesis.pod_entry")
# The most of a job Pod's log Genesis reads (the API server relays it whole; the kubelet rotates container
# logs at 10 MiB by default): the frames of every phase at the output caps must fit (PodRunner checks).
POD_LOG_READ_BYTES = 4 * 1024 * 1024
MAX_PHASES = 3  # syntax, lint, run
_FRAME_OVERHEAD_BYTES = 4 * 1024  # a frame's nonce, names, numbers and problem, beside its two outputs
_POLL_S = 0.25
_START_FAILURES = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}
NUL_STANDIN = "\u2400"


class PodSandboxSettings(BaseSettings):
    """Where and how job Pods run (the operator sets these in `sandbox: pod`)."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    job_image: str = Field("singularity-stack:0.1.0", validation_alias=AliasChoices("GENESIS_JOB_IMAGE"))
    job_namespace: str = Field("", validation_alias=AliasChoices("GENESIS_JOB_NAMESPACE"))
    runtime_class: str = Field("", validation_alias=AliasChoices("GENESIS_RUNTIME_CLASS"))
    # "k=v,k=v": the job Pods' labels besides their own (the stack's; the NetworkPolicy selects on them).
    job_labels: str = Field("", validation_alias=AliasChoices("GENESIS_JOB_LABELS"))
    pod_name: str = Field("", validation_alias=AliasChoices("POD_NAME"))  # this Genesis Pod (downward API)
    pod_uid: str = Field("", validation_alias=AliasChoices("POD_UID"))
    image_pull_policy: str = Field("IfNotPresent", validation_alias=AliasChoices("GENESIS_JOB_IMAGE_PULL_POLICY"))

    def labels(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.job_labels.split(",") if "=" in item)
        found = {key.strip(): value.strip() for key, value in pairs}
        found["app.kubernetes.io/component"] = JOB_COMPONENT
        if self.pod_name:
            found[OWNER_LABEL] = self.pod_name
        return found

    def namespace(self) -> str:
        if self.job_namespace:
            return self.job_namespace
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as handle:
                return handle.read().strip()
        except OSError:
            return "default"


@dataclass(frozen=True)
class PodPhase:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    address_space_bytes: int | None
    continue_on: tuple[int, ...]  # exit codes after which the next phase runs


def job_phases(language: Toolchain, limits: Limits, run: bool) -> list[PodPhase]:
    """Syntax check, lint (when the language has a linter), run: languages.py's commands, in one Pod."""
    phases = [
        PodPhase("syntax", language.syntax_argv, language.env, language.address_space_bytes(limits), (0,)),
    ]
    if language.linter is not None:
        linter = language.linter
        argv = [f"{TOOL_PREFIX}{linter.tool}", *linter.args, language.source_name]
        phases.append(PodPhase("lint", argv, linter.env, None, (0, 1)))
    if run:
        argv = list(language.run_argv(limits))
        phases.append(PodPhase("run", argv, language.env, language.address_space_bytes(limits), ()))
    return phases


def _quantity(count: int) -> str:
    return f"{count // (1024 * 1024)}Mi" if count % (1024 * 1024) == 0 else str(count)


def active_deadline_seconds(limits: Limits, phases: int) -> int:
    return math.ceil(limits.wall_time_s * phases) + STARTUP_ALLOWANCE_S


def log_bytes_needed(max_output_bytes: int, phases: int = MAX_PHASES) -> int:
    """The most the frames of `phases` phases take in the Pod's log: stdout and stderr each at the cap, base64."""
    return phases * (2 * 4 * math.ceil(max_output_bytes / 3) + _FRAME_OVERHEAD_BYTES)


def largest_output_cap(phases: int = MAX_PHASES) -> int:
    """The largest max_output_bytes whose frames fit in the POD_LOG_READ_BYTES Genesis reads."""
    return 3 * ((POD_LOG_READ_BYTES // phases - _FRAME_OVERHEAD_BYTES) // 8)


def output_cap_problem(limits: Limits) -> str | None:
    """Why these limits cannot run in a Pod (a frame cut off by the log read would lose the job's result)."""
    needed = log_bytes_needed(limits.max_output_bytes)
    if needed <= POD_LOG_READ_BYTES:
        return None
    return (
        f"Limits.max_output_bytes={limits.max_output_bytes} is too large for sandbox: pod: {MAX_PHASES} phases' "
        f"stdout and stderr at that cap take up to {needed} bytes of the job Pod's log, more than the "
        f"{POD_LOG_READ_BYTES} bytes Genesis reads; at most {largest_output_cap()}"
    )


def job_pod_manifest(
    *,
    name: str,
    namespace: str,
    image: str,
    code: str,
    language: Toolchain,
    phases: Sequence[PodPhase],
    limits: Limits,
    nonce: str,
    uid: int,
    labels: Mapping[str, str],
    runtime_class: str = "",
    owner: tuple[str, str] | None = None,
    image_pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    """The Pod of one job: restricted PSS, no token, no network (NetworkPolicy), the job's limits."""
    spec = {
        "workdir": WORKDIR,
        "source_name": language.source_name,
        "nonce": nonce,
        "limits": {
            "wall_time_s": limits.wall_time_s,
            "cpu_time_s": limits.cpu_time_s,
            "memory_bytes": limits.memory_bytes,
            "max_processes": limits.max_processes,
            "max_file_bytes": limits.max_file_bytes,
            "max_output_bytes": limits.max_output_bytes,
            "max_open_files": limits.max_open_files,
        },
        "phases": [
            {
                "name": p.name,
                "argv": list(p.argv),
                "env": dict(p.env),
                "address_space_bytes": p.address_space_bytes,
                "continue_on": list(p.continue_on),
            }
            for p in phases
        ],
    }
    # The Pod's memory is the job's and the workdir's (a memory-backed emptyDir counts against it).
    memory = _quantity(limits.job_memory_bytes + limits.workdir_bytes)
    cpu = f"{round(limits.job_cpus * 1000)}m"
    container = {
        "name": JOB_CONTAINER,
        "image": image,
        "imagePullPolicy": image_pull_policy,
        "command": list(ENTRY),
        "env": [
            {"name": SPEC_ENV, "value": json.dumps(spec, separators=(",", ":"))},
            {"name": CODE_ENV, "value": base64.b64encode(code.encode("utf-8")).decode()},
        ],
        "workingDir": WORKDIR,
        # Limits are the job's bounds; requests stay small so that a job does not reserve a whole CPU.
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": cpu, "memory": memory}},
        "volumeMounts": [
            {"name": "box", "mountPath": WORKDIR},
            {"name": "box", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "privileged": False,
        },
        "terminationMessagePolicy": "File",
    }
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:
        owner_name, owner_uid = owner
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": owner_name, "uid": owner_uid}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "activeDeadlineSeconds": active_deadline_seconds(limits, len(phases)),
        "terminationGracePeriodSeconds": 0,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "box", "emptyDir": {"medium": "Memory", "sizeLimit": _quantity(limits.workdir_bytes)}}],
    }
    if runtime_class:
        pod_spec["runtimeClassName"] = runtime_class
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


# -- reading the result -----------------------------------------------------------------------------------


class Frame(BaseModel):
    """One phase's report from the Pod's entry."""

    name: str
    problem: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    output_truncated: bool = False
    memory_limit_hit: bool = False
    elapsed_ms: float = 0.0


def parse_frames(log_text: str, nonce: str, phases: Sequence[PodPhase]) -> list[Frame]:
    """The frames of the phases, in order: the first well-formed one of each phase, each after the last."""
    marker = f"\n{nonce} "
    frames: list[Frame] = []
    for chunk in log_text.split(marker)[1:]:
        if len(frames) >= len(phases):
            break
        line = chunk.split("\n", 1)[0]
        try:
            frame = Frame.model_validate_json(line)
        except ValueError:
            continue
        if frame.name == phases[len(frames)].name:
            frames.append(frame)
    return frames


@dataclass(frozen=True)
class PodEnd:
    """How the job Pod ended, in Kubernetes's words."""

    phase: str
    reason: str = ""  # the Pod's (DeadlineExceeded) or its container's (OOMKilled, Error, ...)
    exit_code: int | None = None

    @property
    def deadline_exceeded(self) -> bool:
        return self.reason == "DeadlineExceeded"

    @property
    def oom_killed(self) -> bool:
        return self.reason == "OOMKilled"


def _decode_output(text: str, cap: int) -> tuple[bytes, bool]:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        data = b""
    return data[:cap], len(data) > cap


def frame_result(frame: Frame | None, end: PodEnd, cap: int) -> SandboxResult:
    """A phase's result as the bubblewrap sandbox reports it; a phase without a frame ended with the Pod."""
    if frame is None:
        return SandboxResult(
            exit_code=None,
            signal=None,
            stdout=b"",
            stderr=f"the job Pod ended: {end.reason or end.phase}\n".encode() if not end.deadline_exceeded else b"",
            timed_out=end.deadline_exceeded,
            output_truncated=False,
            elapsed_ms=0.0,
            memory_limit_hit=end.oom_killed,
        )
    stdout, out_cut = _decode_output(frame.stdout, cap)
    stderr, err_cut = _decode_output(frame.stderr, cap)
    return SandboxResult(
        exit_code=frame.exit_code,
        signal=frame.signal,
        stdout=stdout,
        stderr=stderr,
        timed_out=frame.timed_out,
        output_truncated=frame.output_truncated or out_cut or err_cut,
        elapsed_ms=frame.elapsed_ms,
        memory_limit_hit=frame.memory_limit_hit,
    )


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\x00", NUL_STANDIN)


def job_outcome(
    language: Toolchain,
    phases: Sequence[PodPhase],
    frames: Sequence[Frame],
    end: PodEnd,
    limits: Limits,
    total_ms: float,
) -> JobOutcome:
    """The job's result from its phases' frames and the Pod's end, decided as runner.py decides it."""
    timings = {f.name: f.elapsed_ms for f in frames}
    timings["total"] = round(total_ms, 1)
    by_name = {f.name: f for f in frames}
    cap = limits.max_output_bytes

    def result(name: str) -> SandboxResult:
        frame = by_name.get(name)
        if frame is None and not (end.deadline_exceeded or end.oom_killed):
            # Not the job's doing (its limits would say so): the entry did not run, or the Pod was lost.
            detail = f"{end.phase}, {end.reason or 'no reason'}, exit {end.exit_code}"
            raise SandboxError(f"the job Pod ended without reporting its {name} phase ({detail})")
        return frame_result(frame, end, cap)

    def outcome(status: JobStatus, res: SandboxResult | None, exit_code: int | None, lint: list[str]) -> JobOutcome:
        return JobOutcome(
            status=status,
            stdout=_text(res.stdout) if res else "",
            stderr=_text(res.stderr) if res else "",
            exit_code=exit_code,
            lint=lint,
            timings_ms=timings,
        )

    checked = result("syntax")
    status = classify(checked, language)
    if status is not JobStatus.OK:
        return outcome(JobStatus.SYNTAX_ERROR if status is JobStatus.RUNTIME_ERROR else status, checked, None, [])
    findings: list[str] = []
    if language.linter is not None:
        linter = language.linter
        frame = by_name.get("lint")
        if frame is not None and frame.problem:
            return outcome(JobStatus.ERROR, None, None, []).model_copy(update={"stderr": f"lint: {frame.problem}\n"})
        linted = result("lint")
        lint_status = classify(linted, language)
        stderr = _text(linted.stderr).strip()[:500]
        failure = None
        if linted.exit_code not in (0, 1) or lint_status not in (JobStatus.OK, JobStatus.RUNTIME_ERROR):
            failure = f"{linter.tool} failed ({lint_status.value}, exit {linted.exit_code}): {stderr}"
        else:
            try:
                findings = linter.parse(_text(linted.stdout))
            except LintOutputError as error:
                failure = f"{linter.tool} (exit {linted.exit_code}): {error}; stderr: {stderr}"
            if failure is None and linted.exit_code == 1 and not findings:
                failure = f"{linter.tool} exited 1 without reporting a finding: {stderr}"
        if failure is not None:
            log.error("lint failed", extra={"language": language.name.value, "error": failure})
            return outcome(JobStatus.ERROR, None, None, []).model_copy(update={"stderr": f"lint: {failure}\n"})
    if not any(p.name == "run" for p in phases):
        return outcome(JobStatus.LINT if findings else JobStatus.OK, None, None, findings)
    ran = result("run")
    return outcome(classify(ran, language), ran, ran.exit_code, findings)


def pod_end(pod: Mapping[str, Any]) -> PodEnd | None:
    """None while the Pod runs; how it ended otherwise. SandboxError when it cannot start at all."""
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in _START_FAILURES:
            raise SandboxError(f"the job Pod cannot start: {waiting.get('reason')}: {waiting.get('message', '')}")
        terminated = state.get("terminated")
        if terminated and phase in ("Succeeded", "Failed"):
            return PodEnd(phase, status.get("reason") or terminated.get("reason") or "", terminated.get("exitCode"))
    if phase in ("Succeeded", "Failed"):
        return PodEnd(phase, status.get("reason") or "")
    return None


# -- running ----------------------------------------------------------------------------------------------


class PodRunner:
    """JobRunner's interface (run, active, peak_active, limits), each job in its own Pod."""

    def __init__(
        self, core: Any, settings: PodSandboxSettings, max_concurrent: int = 4, limits: Limits | None = None
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        problem = output_cap_problem(limits or Limits())
        if problem:
            raise ValueError(problem)
        self.core = core  # kubernetes.client.CoreV1Api
        self.settings = settings
        self.namespace = settings.namespace()
        self.max_concurrent = max_concurrent
        self.limits = limits or Limits()
        self._slots = asyncio.Semaphore(max_concurrent)
        self.active = 0
        self.peak_active = 0
        self._cleanups: set[asyncio.Future[None]] = set()  # deletions that outlive a cancelled job

    def selector(self) -> str:
        labels = self.settings.labels()
        wanted = {"app.kubernetes.io/component": JOB_COMPONENT}
        if OWNER_LABEL in labels:
            wanted[OWNER_LABEL] = labels[OWNER_LABEL]
        return ",".join(f"{k}={v}" for k, v in wanted.items())

    async def sweep(self) -> int:
        """Delete the job Pods a previous run of this Genesis Pod left behind; how many there were."""
        found = await asyncio.to_thread(self.core.list_namespaced_pod, self.namespace, label_selector=self.selector())
        for pod in found.items:
            await self._delete(pod.metadata.name)
        if found.items:
            log.warning("deleted %d job Pods left from before", len(found.items))
        return len(found.items)

    async def run(self, code: str, language: str, run: bool = True) -> JobOutcome:
        lang = get_language(language)
        source_bytes = len(code.encode("utf-8"))
        limit = min(self.limits.max_file_bytes, MAX_POD_SOURCE_BYTES)
        if source_bytes > limit:
            message = f"source is {source_bytes} bytes; the limit is {limit} bytes\n"
            return JobOutcome(status=JobStatus.SYNTAX_ERROR, stderr=message, timings_ms={"total": 0.0})
        async with self._slots:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
            try:
                return await self._job(lang, code, run)
            finally:
                self.active -= 1

    async def _job(self, language: Toolchain, code: str, run: bool) -> JobOutcome:
        started = time.perf_counter()
        phases = job_phases(language, self.limits, run)
        nonce = secrets.token_hex(16)
        name = f"genesis-job-{secrets.token_hex(6)}"
        settings = self.settings
        owner = (settings.pod_name, settings.pod_uid) if settings.pod_name and settings.pod_uid else None
        manifest = job_pod_manifest(
            name=name,
            namespace=self.namespace,
            image=settings.job_image,
            code=code,
            language=language,
            phases=phases,
            limits=self.limits,
            nonce=nonce,
            uid=secrets.randbelow(JOB_UID_RANGE[1] - JOB_UID_RANGE[0]) + JOB_UID_RANGE[0],
            labels=settings.labels(),
            runtime_class=settings.runtime_class,
            owner=owner,
            image_pull_policy=settings.image_pull_policy,
        )
        # The create runs on in its thread whatever happens to this job (a cancel, a shutdown): the Pod may
        # exist once it answers, so the deletion below waits for that answer, then deletes.
        created = asyncio.ensure_future(asyncio.to_thread(self.core.create_namespaced_pod, self.namespace, manifest))
        try:
            try:
                await asyncio.shield(created)
            except Exception as error:
                raise SandboxError(f"could not create the job Pod: {_reason(error)}") from None
            end = await self._wait(name, active_deadline_seconds(self.limits, len(phases)) + 30)
            try:
                text = await asyncio.to_thread(
                    self.core.read_namespaced_pod_log,
                    name,
                    self.namespace,
                    container=JOB_CONTAINER,
                    limit_bytes=POD_LOG_READ_BYTES,
                )
            except Exception as error:  # e.g. a Pod its deadline ended before its container started
                log.warning("no log of the job Pod %s: %s", name, _reason(error))
                text = ""
        finally:
            await self._remove(name, created)
        frames = parse_frames("\n" + str(text), nonce, phases)
        return job_outcome(language, phases, frames, end, self.limits, (time.perf_counter() - started) * 1000)

    async def _wait(self, name: str, timeout_s: float) -> PodEnd:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                pod = await asyncio.to_thread(self.core.read_namespaced_pod, name, self.namespace)
            except Exception as error:  # deleted by someone else, the API server unreachable, no right to read
                raise SandboxError(f"could not read the job Pod {name} while it ran: {_reason(error)}") from None
            end = pod_end(self.core.api_client.sanitize_for_serialization(pod))
            if end is not None:
                return end
            if time.monotonic() > deadline:
                raise SandboxError(f"the job Pod {name} did not end within {timeout_s:.0f} s")
            await asyncio.sleep(_POLL_S)

    async def _remove(self, name: str, created: asyncio.Future[Any]) -> None:
        """Delete the job Pod once its create has answered; a cancel of this job (even a second one, while
        it waits here) does not stop that: the deletion is a task of its own, held until it is done."""
        removal = asyncio.ensure_future(self._delete_once_created(name, created))
        self._cleanups.add(removal)
        removal.add_done_callback(self._cleanups.discard)
        await asyncio.shield(removal)

    async def _delete_once_created(self, name: str, created: asyncio.Future[Any]) -> None:
        try:
            await created
        except Exception as error:
            if 400 <= (getattr(error, "status", None) or 0) < 500:
                return  # refused by the API server: no Pod was made (and a 409 names someone else's)
        await self._delete(name)

    async def _delete(self, name: str) -> None:
        try:
            await asyncio.to_thread(self.core.delete_namespaced_pod, name, self.namespace, grace_period_seconds=0)
        except Exception as error:
            if getattr(error, "status", None) != 404:
                log.error("could not delete the job Pod %s: %s", name, _reason(error))


def _reason(error: Exception) -> str:
    body = getattr(error, "body", None)
    if body:
        try:
            return str(json.loads(body).get("message", body))
        except ValueError:
            return str(body)
    return str(error)


def kubernetes_core() -> Any:
    """A CoreV1Api: in-cluster (the Pod's token), or KUBECONFIG outside a cluster."""
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # as set now, not at import
    return client.CoreV1Api()

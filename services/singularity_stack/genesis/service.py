"""The Genesis service: consumes job_requests, validates and runs each job in the sandbox, replies."""

from __future__ import annotations

import logging
from typing import Any, Literal

from prometheus_client import Counter, Gauge
from pydantic import AliasChoices, Field

from singularity_stack import contract as c
from singularity_stack.genesis.pod_sandbox import PodRunner, PodSandboxSettings, kubernetes_core
from singularity_stack.genesis.runner import JobOutcome, JobRunner, probe_linters
from singularity_stack.genesis.sandbox import SandboxError, job_bounds_in_force, probe_sandbox
from singularity_stack.genesis.store import record_execution
from singularity_stack.service.runtime import Service
from singularity_stack.service.settings import ServiceSettings
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore

log = logging.getLogger(__name__)
JOBS = Counter("singularity_genesis_jobs_total", "Jobs run by Genesis, by language and status", ["language", "status"])
SANDBOX_READY = Gauge("singularity_genesis_sandbox_ready", "1 when the job sandbox works here, 0 when it does not")


class GenesisSettings(ServiceSettings):
    max_concurrent_jobs: int = Field(2, ge=1, validation_alias=AliasChoices("GENESIS_MAX_CONCURRENT_JOBS"))
    # bubblewrap: every job in a bubblewrap sandbox here; pod: every job in a Pod of its own (pod_sandbox.py).
    sandbox: Literal["bubblewrap", "pod"] = Field("bubblewrap", validation_alias=AliasChoices("GENESIS_SANDBOX"))


def job_result(request: c.JobRequest, outcome: JobOutcome) -> c.JobResult:
    return c.JobResult(
        **c.reply_fields(request),
        status=outcome.status,
        output=outcome.stdout,
        error=outcome.stderr or None,
        exit_code=outcome.exit_code,
        lint=outcome.lint,
        timings_ms=outcome.timings_ms,
    )


class GenesisService(Service):
    name = "genesis"
    settings: GenesisSettings

    def __init__(self, settings: GenesisSettings) -> None:
        super().__init__(settings)
        self.runner: JobRunner | PodRunner
        if settings.sandbox == "pod":
            self.runner = PodRunner(kubernetes_core(), PodSandboxSettings(), settings.max_concurrent_jobs)
        else:
            self.runner = JobRunner(settings.max_concurrent_jobs)
        self.sandbox_problem: str | None = None
        self.linters: dict[c.Language, tuple[bool, str]] = {}  # linted language -> (works, where | why not)

    async def on_start(self) -> None:
        if isinstance(self.runner, PodRunner):
            await self._start_pod_mode(self.runner)
            return
        # A host (or Pod) where bubblewrap cannot build a sandbox must not look ready: say why instead.
        self.sandbox_problem = await probe_sandbox()
        SANDBOX_READY.set(0 if self.sandbox_problem else 1)
        if self.sandbox_problem:
            log.error("the job sandbox does not work here", extra={"problem": self.sandbox_problem})
            return
        # A linter that cannot run fails every job of its language: say so now, one line each.
        self.linters = await probe_linters(self.runner.limits)
        for language, (works, text) in self.linters.items():
            if not works:
                log.error("%s jobs will fail: %s", language.value, text)

    async def _start_pod_mode(self, runner: PodRunner) -> None:
        """Job Pods a previous run of this Genesis Pod left are deleted; not being allowed to is not ready."""
        try:
            await runner.sweep()
        except Exception as error:
            self.sandbox_problem = f"cannot manage job Pods in namespace {runner.namespace}: {error}"
            log.error("the job Pod sandbox does not work here", extra={"problem": self.sandbox_problem})
        SANDBOX_READY.set(0 if self.sandbox_problem else 1)

    async def readiness(self) -> dict[str, str]:
        problems = await super().readiness()
        if self.sandbox_problem:
            problems["sandbox"] = self.sandbox_problem
        return problems

    def details(self) -> dict[str, str]:
        lint = {f"lint_{lang.value}": text if ok else f"error: {text}" for lang, (ok, text) in self.linters.items()}
        if isinstance(self.runner, PodRunner):
            return {"job_bounds": f"a Pod per job in namespace {self.runner.namespace} (sandbox: pod)", **lint}
        return {"job_bounds": job_bounds_in_force(), **lint}

    async def handle(self, delivery: Delivery[c.JobRequest]) -> None:
        request = delivery.message
        # The consumer hands over only requests whose reply_to is the sender PostgreSQL vouches for;
        # the reply goes to that sender.
        assert delivery.sender is not None and delivery.sender == request.reply_to
        try:
            result = job_result(request, await self.runner.run(request.code, request.language.value, request.run))
        except SandboxError as error:
            # The sandbox itself is broken (not the job): say so at once rather than let the caller wait.
            log.error("sandbox failure", extra={"request_id": str(request.request_id), "error": str(error)})
            result = c.JobResult(
                request_id=request.request_id,
                recipient=delivery.sender,
                status=c.JobStatus.ERROR,
                error=f"sandbox failure: {error}",
            )
        await record_execution(delivery.db, request, result)
        await self.replies.send(delivery, result)  # on the path the request came by (NATS in dual operation)
        JOBS.labels(request.language.value, result.status.value).inc()

    def consumers(self) -> list[Consumer[Any]]:
        return [
            Consumer(
                self.queue,
                "job_requests",
                c.JobRequest,
                self.handle,
                batch_size=self.settings.max_concurrent_jobs,
                concurrency=self.settings.max_concurrent_jobs,
                visibility_timeout=120,  # well beyond a job's wall-time limit
                store=IdempotencyStore(self.db),
            )
        ]

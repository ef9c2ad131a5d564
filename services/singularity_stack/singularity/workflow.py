"""A coding task as a SPARC workflow (specification, pseudocode, architecture, refinement, completion).

Every request a task sends becomes a step in the database *before* it is published, and its reply
is stored on that step when it arrives. A step is found by its stable identity, (phase, name) such
as ("refinement", "validate-round-2"), never by its position: a task interrupted by a restart is
simply run again from the top, possibly by a newer version of this workflow with steps added,
removed or reordered, and each step that has a reply replays it from the database, a step still
waiting re-publishes its request under the same request_id (the receiver deduplicates) and waits
on, and a step the task never had is sent. Migration 0004 names the steps of tasks begun before
names existed exactly as the names below; renaming a step here means a migration too.
A reply that does not arrive by the step's deadline fails the step, and the task, clearly.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from prometheus_client import Counter

from singularity_stack import contract as c
from singularity_stack.singularity.code import ambiguity, extract_code, unified_diff
from singularity_stack.singularity.store import TaskStore
from singularity_stack.singularity.waiter import ReplyWaiter

log = logging.getLogger(__name__)
TASKS = Counter("singularity_tasks_total", "Tasks that ended, by outcome", ["outcome"])
for _outcome in ("succeeded", "failed"):  # exported from the start, so a failure ratio has a denominator at once
    TASKS.labels(_outcome)
R = TypeVar("R", bound=c.Reply)
Build = Callable[[dict[str, Any]], c.Request]  # from the fields every request shares to the request

REQUEST_MODEL: dict[str, type[c.Request]] = {
    "llm": c.LlmRequest,
    "job": c.JobRequest,
    "approval": c.ApprovalRequest,
    "question": c.QuestionRequest,
}
REPLY_MODEL: dict[str, type[c.Reply]] = {
    "llm": c.LlmResult,
    "job": c.JobResult,
    "approval": c.ApprovalResponse,
    "question": c.QuestionResponse,
}
ACCEPTED_JOB_STATUSES = {c.JobStatus.OK, c.JobStatus.LINT}


class StepFailed(Exception):
    """A step got no usable reply; the message is the task's failure reason."""


@dataclass(frozen=True)
class TaskLimits:
    """Deadlines and budgets of a task's requests (Genesis's sandbox.Limits bound a job's processes)."""

    llm_timeout: float = 120.0
    job_timeout: float = 120.0
    human_timeout: float = 24 * 3600.0
    max_fix_attempts: int = 2
    daily_budget_usd: float = 10.0
    requests_per_minute: int = 60


class Publisher(Protocol):
    """Where requests go: the shared queue, or NATS too in dual operation (publisher.py)."""

    async def publish(self, message: c.Message) -> int: ...


@dataclass
class Context:
    """What every task run of one instance shares."""

    instance: str
    store: TaskStore
    queue: Publisher
    waiter: ReplyWaiter
    limits: TaskLimits


# How often a step waiting for its reply also looks for it in the database (see _step).
REPLY_RECHECK_SECONDS = 5.0


class TaskRun:
    def __init__(self, ctx: Context, task: dict[str, Any]) -> None:
        self.ctx = ctx
        self.task_id: uuid.UUID = task["id"]
        self.agent_id: str = task["agent_id"]
        self.description: str = task["description"]
        self.language: str = task["language"]
        self.files: dict[str, str] = task["files"]
        self.asked: set[tuple[str, str]] = set()  # identities used in this run, each at most once

    # -- steps -----------------------------------------------------------------------------------

    async def _step(self, phase: str, name: str, kind: str, timeout: float, build: Build) -> c.Reply:
        """Send the request of step (phase, name), or find it already sent, and wait for its reply."""
        self._claim(phase, name)
        store = self.ctx.store
        step = await store.step(self.task_id, phase, name)
        if step is None:
            deadline = datetime.now(UTC) + timedelta(seconds=timeout)
            common = {"reply_to": self.ctx.instance, "agent_id": self.agent_id, "deadline": deadline}
            request = build(common)
            await store.add_step(self.task_id, phase, name, kind, request)  # recorded before it is sent
        elif step.kind != kind:
            raise StepFailed(f"{phase}: step {name!r} was recorded as a {step.kind} request, not {kind}")
        elif step.state == "done":
            return REPLY_MODEL[kind].model_validate(step.reply)
        elif step.state in ("failed", "expired"):
            raise StepFailed(f"{phase}: {step.error}")
        else:
            request = REQUEST_MODEL[kind].model_validate(step.request)
        await store.set_phase(self.task_id, phase)
        future = self.ctx.waiter.expect(request.request_id)
        await self.ctx.queue.publish(request)
        if step is not None:  # resumed: the reply may have been stored before we started listening
            again = await store.step(self.task_id, phase, name)
            if again is not None and again.state == "done":
                self.ctx.waiter.forget(request.request_id)
                return REPLY_MODEL[kind].model_validate(again.reply)
        remaining = (request.deadline - datetime.now(UTC)).total_seconds() if request.deadline else timeout
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(remaining, 0.001)
        while True:
            try:
                # The reply consumer wakes us after its commit; if that wake-up was lost (the commit's answer
                # never came back, so the redelivery was a duplicate) the stored reply is found here instead.
                wait = min(REPLY_RECHECK_SECONDS, max(give_up - loop.time(), 0.001))
                reply = await asyncio.wait_for(asyncio.shield(future), timeout=wait)
                break
            except TimeoutError:
                stored = await store.step(self.task_id, phase, name)
                if stored is not None and stored.state == "done":
                    self.ctx.waiter.forget(request.request_id)
                    reply = REPLY_MODEL[kind].model_validate(stored.reply)
                    break
                if loop.time() < give_up:
                    continue
            self.ctx.waiter.forget(request.request_id)
            error = f"no {kind} reply within {timeout:g}s (deadline {request.deadline:%Y-%m-%d %H:%M:%S} UTC)"
            await store.fail_step(request.request_id, "expired", error)
            raise StepFailed(f"{phase}: {error}") from None
        if isinstance(reply, c.LlmResult) and reply.error is not None:
            raise StepFailed(f"{phase}: the LLM request failed: {reply.error}")
        return reply

    def _claim(self, phase: str, name: str) -> None:
        """A name asked twice in one run would replay the first step's reply into the second."""
        if (phase, name) in self.asked:
            raise StepFailed(f"{phase}: the workflow asks step {name!r} twice")
        self.asked.add((phase, name))

    async def _respect_limits(self) -> None:
        """The agent's daily LLM budget (fail) and requests-per-minute limit (wait)."""
        limits = self.ctx.limits
        while True:
            spent, last_minute = await self.ctx.store.agent_usage(self.agent_id)
            if spent >= limits.daily_budget_usd:
                raise StepFailed(
                    f"agent {self.agent_id} spent ${spent:.4f} today; its daily LLM budget is "
                    f"${limits.daily_budget_usd}"
                )
            if last_minute < limits.requests_per_minute:
                return
            await asyncio.sleep(1.0)

    async def _ask(self, phase: str, name: str, kind: str, timeout: float, build: Build, reply_type: type[R]) -> R:
        reply = await self._step(phase, name, kind, timeout, build)
        assert isinstance(reply, reply_type)
        return reply

    async def llm(self, phase: str, name: str, task_type: str, prompt: str) -> c.LlmResult:
        await self._respect_limits()
        messages = [
            {"role": "system", "content": f"You are a careful software engineer. Language: {self.language}."},
            {"role": "user", "content": prompt},
        ]
        return await self._ask(
            phase,
            name,
            "llm",
            self.ctx.limits.llm_timeout,
            lambda common: c.LlmRequest(**common, task_type=task_type, messages=messages),
            c.LlmResult,
        )

    async def job(self, phase: str, name: str, code: str) -> c.JobResult:
        return await self._ask(
            phase,
            name,
            "job",
            self.ctx.limits.job_timeout,
            lambda common: c.JobRequest(**common, code=code, language=self.language),
            c.JobResult,
        )

    async def approval(
        self, phase: str, name: str, file_path: str, diff: str, answered: list[c.AnsweredQuestion]
    ) -> c.ApprovalResponse:
        return await self._ask(
            phase,
            name,
            "approval",
            self.ctx.limits.human_timeout,
            lambda common: c.ApprovalRequest(
                **common, file_path=file_path, diff=diff, description=self.description, answered=answered
            ),
            c.ApprovalResponse,
        )

    async def question(self, phase: str, name: str, question: str, context: str) -> c.QuestionResponse:
        return await self._ask(
            phase,
            name,
            "question",
            self.ctx.limits.human_timeout,
            lambda common: c.QuestionRequest(**common, question=question, context=context),
            c.QuestionResponse,
        )

    # -- the SPARC phases ------------------------------------------------------------------------

    @property
    def target_path(self) -> str:
        if self.files:
            return next(iter(self.files))
        return c.Language(self.language).source_name

    async def run(self) -> None:
        try:
            result = await self._sparc()
        except StepFailed as failure:
            log.info("task %s failed: %s", self.task_id, failure)
            await self.ctx.store.fail(self.task_id, str(failure))
            TASKS.labels("failed").inc()
            return
        await self.ctx.store.finish(self.task_id, result)
        TASKS.labels("succeeded").inc()
        log.info("task %s succeeded", self.task_id)

    async def _sparc(self) -> dict[str, Any]:
        brief = self.description
        files = "".join(f"\n--- {path} ---\n{content}" for path, content in self.files.items())
        vague = ambiguity(self.description)
        answered: list[c.AnsweredQuestion] = []  # the reviewer of the change sees what it was built on
        if vague:
            asked = f"Could you say more about what this task should do? ({vague})"
            clarification = await self.question("specification", "clarify", asked, f"Task: {self.description}")
            answered.append(
                c.AnsweredQuestion(question=asked, answer=clarification.response, answered_by=clarification.answered_by)
            )
            brief = f"{self.description}\nClarification from a human: {clarification.response}"

        spec = await self.llm(
            "specification", "specification", "planning", f"Write a short specification for: {brief}{files}"
        )
        pseudo = await self.llm(
            "pseudocode", "pseudocode", "pseudocode", f"Pseudocode for this specification:\n{spec.result}"
        )
        design = await self.llm("architecture", "architecture", "architect", f"Architecture for:\n{pseudo.result}")
        answer = await self.llm(
            "refinement",
            "code",
            "code_generation",
            f"Write the complete {self.language} program for {self.target_path}.\n"
            f"Task: {brief}\nDesign:\n{design.result}{files}\nAnswer with one fenced code block.",
        )
        code = self._code_of(answer)
        for attempt in range(self.ctx.limits.max_fix_attempts + 1):
            verdict = await self.job("refinement", f"validate-round-{attempt + 1}", code)
            if verdict.status in ACCEPTED_JOB_STATUSES:
                break
            if verdict.status is c.JobStatus.ERROR:
                # Genesis could not check the code (a linter that cannot run, a broken sandbox): that says
                # nothing about the code, so neither a model's fix nor acceptance is the answer.
                raise StepFailed(f"refinement: Genesis could not check the code: {verdict.error or 'no reason given'}")
            if attempt == self.ctx.limits.max_fix_attempts:
                raise StepFailed(
                    f"refinement: the code still fails after {attempt} fix(es): {verdict.status}: {verdict.error or ''}"
                )
            fix = await self.llm(
                "refinement",
                f"fix-round-{attempt + 1}",
                "coder",
                f"This {self.language} code fails with {verdict.status}:\n{verdict.error}\n\nCode:\n{code}\n"
                "Answer with the corrected program in one fenced code block.",
            )
            code = self._code_of(fix)

        review = await self.llm("completion", "review", "qa", f"Review this {self.language} code:\n{code}")
        diff = unified_diff(self.target_path, self.files.get(self.target_path, ""), code)
        decision = await self.approval("completion", "approval", self.target_path, diff, answered)
        if not decision.approved:
            who = decision.decided_by or "a reviewer"
            raise StepFailed(f"completion: rejected by {who}: {decision.reason}")
        return {
            "file_path": self.target_path,
            "code": code,
            "diff": diff,
            "output": verdict.output,
            "lint": verdict.lint,
            "review": review.result,
            "approved_by": decision.decided_by,
        }

    def _code_of(self, answer: c.LlmResult) -> str:
        code = extract_code(answer.result or "")
        if code is None:
            raise StepFailed(f"refinement: the model {answer.model} answered without a code block")
        return code

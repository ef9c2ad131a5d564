"""The Singularity service: the tasks API, the task runner, and the consumers of this instance's replies."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Any

import psycopg
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from singularity_stack import contract as c
from singularity_stack.service.console import ConsoleLogin
from singularity_stack.service.http import BadRequest, error_response, json_response, parse_body, path_uuid
from singularity_stack.service.runtime import Job, Service, every
from singularity_stack.service.settings import ServiceSettings
from singularity_stack.service.text import RequiredText, StorableText
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, Unavailable
from singularity_stack.singularity.console import TaskConsole, base_url
from singularity_stack.singularity.publisher import PublishTo, RequestPublisher
from singularity_stack.singularity.store import TaskStore
from singularity_stack.singularity.waiter import ReplyWaiter
from singularity_stack.singularity.workflow import Context, TaskLimits, TaskRun
from singularity_stack.topology import reply_queue

log = logging.getLogger(__name__)


class SingularitySettings(ServiceSettings):
    # Every task API call needs 'Authorization: Bearer <token>'; up and the operator generate it.
    api_token: str = Field(min_length=16, validation_alias=AliasChoices("SINGULARITY_API_TOKEN", "api_token"))
    instance_id: str = Field("", validation_alias=AliasChoices("SINGULARITY_INSTANCE", "instance_id"))
    llm_timeout_seconds: float = Field(120.0, validation_alias=AliasChoices("LLM_TIMEOUT_SECONDS"))
    job_timeout_seconds: float = Field(120.0, validation_alias=AliasChoices("JOB_TIMEOUT_SECONDS"))
    human_timeout_seconds: float = Field(86400.0, validation_alias=AliasChoices("HUMAN_TIMEOUT_SECONDS"))
    daily_budget_usd: float = Field(10.0, validation_alias=AliasChoices("DAILY_LLM_BUDGET_USD"))
    requests_per_minute: int = Field(60, validation_alias=AliasChoices("LLM_REQUESTS_PER_MINUTE"))
    # Nexus's review page (e.g. http://127.0.0.1:8002): a task page links to its pending card. Unset: no link.
    nexus_console_url: str = Field("", validation_alias=AliasChoices("NEXUS_CONSOLE_URL", "nexus_console_url"))
    # Dual operation (MESSAGING_MODE=dual): requests on the shared queue, on NATS, or on both.
    publish_to: PublishTo = Field("pgmq", validation_alias=AliasChoices("SINGULARITY_PUBLISH_TO", "publish_to"))

    @field_validator("nexus_console_url")
    @classmethod
    def _nexus_url(cls, value: str) -> str:
        return base_url(value, "NEXUS_CONSOLE_URL")

    @model_validator(mode="after")
    def _instance_from_database(self) -> SingularitySettings:
        """Without SINGULARITY_INSTANCE, the instance is named by its database (…/singularity_3)."""
        if not self.instance_id:
            match = re.search(r"(singularity_[1-9][0-9]*)$", self.database_url.split("?")[0])
            if not match:
                raise ValueError("set SINGULARITY_INSTANCE (e.g. singularity_1): DATABASE_URL does not name it")
            self.instance_id = match.group(1)
        if self.publish_to != "pgmq" and self.messaging_mode != "dual":
            raise ValueError(
                f"SINGULARITY_PUBLISH_TO={self.publish_to} needs MESSAGING_MODE=dual (it is {self.messaging_mode})"
            )
        return self

    def limits(self) -> TaskLimits:
        return TaskLimits(
            llm_timeout=self.llm_timeout_seconds,
            job_timeout=self.job_timeout_seconds,
            human_timeout=self.human_timeout_seconds,
            daily_budget_usd=self.daily_budget_usd,
            requests_per_minute=self.requests_per_minute,
        )


class NewTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: RequiredText = Field(max_length=20_000)
    files: dict[RequiredText, StorableText] = Field(default_factory=dict, max_length=50)
    language: c.Language = c.Language.PYTHON
    agent_id: RequiredText = Field("default-agent", max_length=200)


class SingularityService(Service):
    name = "singularity"
    settings: SingularitySettings

    def __init__(self, settings: SingularitySettings) -> None:
        super().__init__(settings)
        self.store = TaskStore(self.db)
        self.waiter = ReplyWaiter()
        publisher = RequestPublisher(self.queue, self.messaging, settings.instance_id, settings.publish_to)
        self.context = Context(settings.instance_id, self.store, publisher, self.waiter, settings.limits())
        self.running: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.interrupted: set[uuid.UUID] = set()  # workflows a database outage ended: replayed once it is back
        instance = settings.instance_id
        self.login = ConsoleLogin(settings.api_token, instance, f"Singularity · {instance}", landing="/")
        self.pages = TaskConsole(self.store, instance)

    def nats_user(self) -> str:
        return self.settings.instance_id

    # -- tasks -----------------------------------------------------------------------------------

    async def start_task(self, task_id: uuid.UUID) -> None:
        task = await self.store.task(task_id)
        if task is None or task_id in self.running:
            return
        run = asyncio.create_task(TaskRun(self.context, task).run(), name=f"task-{task_id}")
        self.running[task_id] = run
        run.add_done_callback(lambda done: self._ended(task_id, done))

    def _ended(self, task_id: uuid.UUID, run: asyncio.Task[None]) -> None:
        self.running.pop(task_id, None)
        error = None if run.cancelled() else run.exception()
        if isinstance(error, (psycopg.OperationalError, Unavailable)):
            log.warning(
                "task %s interrupted (%s: %s); replaying it once the database answers",
                task_id,
                error.__class__.__name__,
                error,
            )
            self.interrupted.add(task_id)

    async def _resume_interrupted(self) -> None:
        for task_id in list(self.interrupted):
            await self.start_task(task_id)  # raises while the database is still away: tried again later
            self.interrupted.discard(task_id)

    def jobs(self) -> list[Job]:
        return [lambda stop: every(2.0, stop, self._resume_interrupted, "resume-interrupted-tasks")]

    async def on_start(self) -> None:
        for task_id in await self.store.unfinished_tasks():
            log.info("resuming task %s", task_id)
            await self.start_task(task_id)

    async def stop(self) -> None:
        for run in list(self.running.values()):
            run.cancel()  # replayed from the database on the next start
        await asyncio.gather(*self.running.values(), return_exceptions=True)
        await super().stop()

    # -- replies ---------------------------------------------------------------------------------

    async def _on_reply(self, delivery: Delivery[Any]) -> None:
        kind = await self.store.record_reply(delivery.db, delivery.message)
        if kind is None:
            log.warning("reply %s waits for no step (late, or not ours)", delivery.message.request_id)
            return
        # Wake the workflow only once the reply is committed: before, a rollback could leave it acting on
        # a reply the database does not hold. If Singularity dies in between, the workflow replays on
        # restart and finds the stored reply.
        reply = delivery.message
        delivery.after_commit(lambda: self.waiter.resolve(reply))

    def consumers(self) -> list[Consumer[Any]]:
        store = IdempotencyStore(self.db)
        return [
            Consumer(self.queue, reply_queue(kind, self.context.instance), model, self._on_reply, store=store)
            for kind, model in c.REPLIES.items()
        ]

    # -- HTTP API --------------------------------------------------------------------------------

    def api_token(self) -> str | None:
        return self.settings.api_token

    def console(self) -> ConsoleLogin:
        return self.login

    async def create(self, request: Request) -> Response:
        try:
            body = await parse_body(request, NewTask)
        except BadRequest as bad:
            return bad.response()
        task_id = uuid.uuid4()
        await self.store.create_task(task_id, body.agent_id, body.description, body.language.value, body.files)
        await self.start_task(task_id)
        return json_response({"id": task_id, "state": "pending", "instance": self.context.instance}, 202)

    async def show(self, request: Request) -> Response:
        try:
            task_id = path_uuid(request, "task_id")
        except BadRequest as bad:
            return bad.response()
        task = await self.store.task(task_id)
        if task is None:
            return error_response(404, f"task_id: no task {task_id} on {self.context.instance}")
        steps = [step | {"review_url": self._review_url(step)} for step in await self.store.steps(task_id)]
        models = sorted({s["model"] for s in steps if s["model"]})
        return json_response(task | {"steps": steps, "models_used": models, "instance": self.context.instance})

    def _review_url(self, step: dict[str, Any]) -> str | None:
        """The Nexus card a human step waits on, when Nexus's page is known (the card is gone once decided)."""
        nexus = self.settings.nexus_console_url
        if not nexus or step["kind"] not in ("approval", "question") or step["state"] != "waiting":
            return None
        return f"{nexus}/#request-{step['request_id']}"

    async def index(self, request: Request) -> Response:
        return json_response(await self.store.tasks())

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/tasks", self.create, methods=["POST"]),
            Route("/tasks", self.index, methods=["GET"]),
            Route("/tasks/{task_id}", self.show, methods=["GET"]),
            *self.pages.routes(),
        ]

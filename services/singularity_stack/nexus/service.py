"""The Nexus service: routes LLM requests to a model and replies; holds approvals and questions for humans."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import Gauge
from pydantic import AliasChoices, Field, field_validator
from starlette.routing import BaseRoute

from singularity_stack import contract as c
from singularity_stack.nexus.completion import Completion, RoutingError
from singularity_stack.nexus.hitl import Hitl
from singularity_stack.nexus.reviewers import Reviewers
from singularity_stack.nexus.routing_config import RoutingConfig, load_routing_config
from singularity_stack.nexus.store import record_llm_call
from singularity_stack.service.logs import route_library_loggers
from singularity_stack.service.runtime import Job, Service, every
from singularity_stack.service.settings import ServiceSettings
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore
from singularity_stack.sharedqueue.nats_replies import path_of

if TYPE_CHECKING:
    from singularity_stack.nexus.router import LlmRouter

log = logging.getLogger(__name__)
HELD_FOR_NATS = Gauge(
    "singularity_nexus_hitl_pending_nats", "Pending approvals and questions whose answer goes out on NATS"
)


class NexusSettings(ServiceSettings):
    ui_token: str = Field(min_length=16, validation_alias=AliasChoices("NEXUS_UI_TOKEN", "ui_token"))
    # {"<name>": "sha256:<hex>"} (nexus/reviewers.py); reread when it changes. Unset: the shared token only.
    reviewers_file: Path | None = Field(None, validation_alias=AliasChoices("NEXUS_REVIEWERS_FILE", "reviewers_file"))
    routing_config: Path | None = Field(None, validation_alias=AliasChoices("NEXUS_ROUTING_CONFIG", "routing_config"))
    max_concurrent_llm: int = Field(8, ge=1, validation_alias=AliasChoices("NEXUS_MAX_CONCURRENT_LLM"))
    expiry_interval_seconds: float = Field(30.0, validation_alias=AliasChoices("HITL_EXPIRY_INTERVAL_SECONDS"))
    # {"singularity_1": "http://127.0.0.1:8003", ...}: each card links to its task there. Unset: no links.
    singularity_console_urls: dict[str, str] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("NEXUS_SINGULARITY_CONSOLE_URLS", "singularity_console_urls"),
    )

    @field_validator("singularity_console_urls")
    @classmethod
    def _console_urls(cls, urls: dict[str, str]) -> dict[str, str]:
        checked = {}
        for instance, url in urls.items():
            if not re.fullmatch(r"singularity_[1-9][0-9]{0,3}", instance):
                raise ValueError(f"NEXUS_SINGULARITY_CONSOLE_URLS: {instance!r} is not an instance (singularity_N)")
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
                raise ValueError(
                    f"NEXUS_SINGULARITY_CONSOLE_URLS: {instance}: {url!r} is not an http(s) base URL "
                    "such as http://127.0.0.1:8003"
                )
            checked[instance] = url.strip().rstrip("/")
        return checked


class NexusService(Service):
    name = "nexus"
    settings: NexusSettings

    def __init__(self, settings: NexusSettings) -> None:
        super().__init__(settings)
        # Read and checked now (a bad file stops Nexus at start); the router that uses it loads in the background.
        self.routing = load_routing_config(settings.routing_config)
        self._router: asyncio.Task[LlmRouter] | None = None
        self.hitl = Hitl(self.db, self.queue, self.replies)
        self.hitl_feed = self.hitl.feed(settings.database_url)  # the other replicas' HITL changes
        self.reviewers = Reviewers(settings.reviewers_file)  # a bad file stops Nexus here, with the reason

    async def on_start(self) -> None:
        # litellm takes seconds to import: approvals, questions and the UI do not wait for it. LLM requests
        # wait for it in their handler (claimed, or still in the durable queue); /readyz says which.
        self._router = asyncio.create_task(asyncio.to_thread(load_router, self.routing), name="load-llm-router")

    async def router(self) -> LlmRouter:
        assert self._router is not None, "Nexus has not started"
        return await asyncio.shield(self._router)  # a cancelled handler must not cancel the load

    def router_state(self) -> str:
        if self._router is None or not self._router.done():
            return "loading"
        if self._router.cancelled():
            return "stopped"
        error = self._router.exception()
        return "ready" if error is None else f"failed: {error.__class__.__name__}: {error}"

    async def readiness(self) -> dict[str, str]:
        problems = await super().readiness()
        state = self.router_state()
        if state.startswith("failed"):
            problems["llm_router"] = state  # loading is not a problem; a router that cannot load is
        if not self.hitl_feed.connected.is_set():
            problems["hitl_feed"] = "not listening: browsers here would miss other replicas' changes"
        return problems

    def details(self) -> dict[str, str]:
        return {"llm_router": self.router_state()}

    async def route(self, delivery: Delivery[c.LlmRequest]) -> None:
        router = await self.router()
        request = delivery.message
        # The reply goes to the instance PostgreSQL vouches sent the request, never to one the body names.
        assert delivery.sender is not None
        reply = {"request_id": request.request_id, "recipient": delivery.sender}
        messages = [m.model_dump() for m in request.messages]
        completion: Completion | None = None
        try:
            completion = await router.complete(request.task_type, messages, request.complexity)
            result = c.LlmResult(
                **reply,
                result=completion.text,
                model=completion.model,
                complexity=completion.complexity,
                cost_usd=completion.cost_usd,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            )
        except RoutingError as error:
            # Retries and fallbacks are spent: tell the agent now instead of letting it wait for its deadline.
            log.warning("LLM routing failed", extra={"request_id": str(request.request_id), "error": str(error)})
            result = c.LlmResult(**reply, error=str(error))
        await record_llm_call(delivery.db, request, delivery.sender, completion, result)
        await self.replies.send(delivery, result)  # on the path the request came by (NATS in dual operation)

    async def hold_for_humans(self, delivery: Delivery[Any]) -> None:
        assert delivery.sender is not None  # requests always carry their vouched sender
        await self.hitl.receive(
            delivery.db, delivery.message, delivery.sender, delivery.after_commit, path_of(delivery)
        )

    def consumers(self) -> list[Consumer[Any]]:
        store = IdempotencyStore(self.db)
        return [
            Consumer(
                self.queue,
                "llm_requests",
                c.LlmRequest,
                self.route,
                batch_size=self.settings.max_concurrent_llm,
                concurrency=self.settings.max_concurrent_llm,
                visibility_timeout=300,  # longer than the router's timeout with retries
                store=store,
            ),
            Consumer(self.queue, "approval_requests", c.ApprovalRequest, self.hold_for_humans, store=store),
            Consumer(self.queue, "question_requests", c.QuestionRequest, self.hold_for_humans, store=store),
        ]

    async def count_held_for_nats(self) -> None:
        HELD_FOR_NATS.set(await self.hitl.store.pending_on_nats())

    def jobs(self) -> list[Job]:
        jobs: list[Job] = [
            lambda stop: every(self.settings.expiry_interval_seconds, stop, self.hitl.expire_overdue, "expiry"),
            self.hitl_feed.run,
        ]
        if self.messaging.enabled:  # readiness to retire NATS: no human's answer may still be owed on it
            jobs.append(lambda stop: every(10.0, stop, self.count_held_for_nats, "hitl-pending-nats"))
        return jobs

    def routes(self) -> list[BaseRoute]:
        return self.hitl.routes(self.settings.ui_token, self.reviewers, self.settings.singularity_console_urls)


def load_router(config: RoutingConfig) -> LlmRouter:
    """Import litellm and build the router (in a worker thread: the event loop keeps serving meanwhile)."""
    from singularity_stack.nexus.router import LlmRouter

    route_library_loggers()  # litellm just installed its own (plain, coloured) handlers: one JSON stream
    router = LlmRouter(config)
    route_library_loggers()
    return router

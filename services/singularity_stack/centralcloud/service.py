"""The CentralCloud service: makes sure every queue exists, prunes archives, learns from them, reports."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
from prometheus_client import Counter, Gauge
from pydantic import AliasChoices, Field
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from singularity_stack.centralcloud import analytics, page
from singularity_stack.centralcloud.retention import prune_archives
from singularity_stack.centralcloud.store import CentralCloudStore
from singularity_stack.provision.queues import ensure_queues
from singularity_stack.service.http import json_response
from singularity_stack.service.runtime import Job, Service, every
from singularity_stack.service.settings import ServiceSettings
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("singularity_queue_depth", "Messages in a queue (pgmq.metrics_all)", ["queue"])
QUEUE_VISIBLE = Gauge("singularity_queue_visible", "Messages ready to be read now", ["queue"])
OLDEST_AGE = Gauge("singularity_queue_oldest_message_age_seconds", "Age of the oldest message", ["queue"])
PRUNED = Counter("singularity_archive_pruned_total", "Archived messages pruned by retention", ["queue"])


class CentralCloudSettings(ServiceSettings):
    # The analytics page and API need 'Authorization: Bearer <token>'; up and the operator generate it.
    api_token: str = Field(min_length=16, validation_alias=AliasChoices("CENTRALCLOUD_API_TOKEN", "api_token"))
    analytics_url: str = Field(validation_alias=AliasChoices("SHARED_QUEUE_ANALYTICS_URL", "analytics_url"))
    retention_days: int = Field(90, ge=1, validation_alias=AliasChoices("SHARED_QUEUE_RETENTION_DAYS"))
    singularity_instances: int = Field(1, ge=1, validation_alias=AliasChoices("SINGULARITY_INSTANCES"))
    stack_prefix: str = Field("", validation_alias=AliasChoices("STACK_PREFIX"))
    prune_interval_seconds: float = Field(3600.0, validation_alias=AliasChoices("PRUNE_INTERVAL_SECONDS"))
    analytics_interval_seconds: float = Field(60.0, validation_alias=AliasChoices("ANALYTICS_INTERVAL_SECONDS"))
    metrics_interval_seconds: float = Field(10.0, validation_alias=AliasChoices("METRICS_INTERVAL_SECONDS"))


class CentralCloudService(Service):
    name = "centralcloud"
    settings: CentralCloudSettings

    def __init__(self, settings: CentralCloudSettings) -> None:
        super().__init__(settings)
        self.layout = StackLayout(settings.singularity_instances, settings.stack_prefix)
        self.store = CentralCloudStore(self.db)

    async def on_start(self) -> None:
        created = await asyncio.to_thread(self._ensure_queues)
        log.info("queues checked", extra={"queues_created": created, "queues": len(self.layout.queues)})

    def _ensure_queues(self) -> list[str]:
        with psycopg.connect(self.settings.shared_queue_url) as conn:
            return ensure_queues(conn, self.layout)

    # -- periodic jobs ---------------------------------------------------------------------------

    async def prune(self) -> dict[str, int]:
        days = self.settings.retention_days
        pruned = await asyncio.to_thread(prune_archives, self.settings.shared_queue_url, days)
        await self.store.record_prune_run(days, pruned)
        for queue, count in pruned.items():
            PRUNED.labels(queue).inc(count)
        log.info("pruned archives", extra={"retention_days": days, "pruned": sum(pruned.values()), "by_queue": pruned})
        return pruned

    async def learn(self) -> dict[str, Any]:
        report = await asyncio.to_thread(analytics.report, self.settings.analytics_url)
        await self.store.add_report(report)
        return report

    async def observe_queues(self) -> None:
        for metrics in await self.queue.metrics_all():
            QUEUE_DEPTH.labels(metrics.queue).set(metrics.length)
            QUEUE_VISIBLE.labels(metrics.queue).set(metrics.visible)
            OLDEST_AGE.labels(metrics.queue).set(metrics.oldest_age_seconds or 0)

    def jobs(self) -> list[Job]:
        s = self.settings
        return [
            lambda stop: every(s.prune_interval_seconds, stop, self.prune, "prune"),
            lambda stop: every(s.analytics_interval_seconds, stop, self.learn, "analytics"),
            lambda stop: every(s.metrics_interval_seconds, stop, self.observe_queues, "queue-metrics"),
        ]

    # -- HTTP ------------------------------------------------------------------------------------

    def api_token(self) -> str | None:
        return self.settings.api_token

    async def analytics_json(self, request: Request) -> Response:
        report, computed_at = await self.store.latest_report()
        return json_response({"computed_at": computed_at, "report": report})

    async def analytics_page(self, request: Request) -> Response:
        return HTMLResponse(page.render(*await self.store.latest_report()))

    async def prune_runs(self, request: Request) -> Response:
        return json_response(await self.store.prune_runs())

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.analytics_page),
            Route("/analytics", self.analytics_json),
            Route("/prune-runs", self.prune_runs),
        ]

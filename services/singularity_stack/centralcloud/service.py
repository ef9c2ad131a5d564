"""The CentralCloud service: makes sure every queue exists, prunes archives, learns from them, reports."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
from nats.aio.client import Client
from prometheus_client import Counter, Gauge
from pydantic import AliasChoices, Field
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from singularity_stack.centralcloud import analytics, page
from singularity_stack.centralcloud.retention import prune_archives
from singularity_stack.centralcloud.store import CentralCloudStore
from singularity_stack.provision.queues import ensure_queues
from singularity_stack.service.console import ConsoleLogin, StaticAssets
from singularity_stack.service.http import error_response, json_response
from singularity_stack.service.runtime import Job, Service, every
from singularity_stack.service.settings import ServiceSettings
from singularity_stack.sharedqueue.nats_streams import ensure_streams
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.topology import StackLayout

log = logging.getLogger(__name__)

QUEUE_DEPTH = Gauge("singularity_queue_depth", "Messages in a queue (pgmq.metrics_all)", ["queue"])
QUEUE_VISIBLE = Gauge("singularity_queue_visible", "Messages ready to be read now", ["queue"])
OLDEST_AGE = Gauge("singularity_queue_oldest_message_age_seconds", "Age of the oldest message", ["queue"])
PRUNED = Counter("singularity_archive_pruned_total", "Archived messages pruned by retention", ["queue"])
RECOMPUTED = Counter("centralcloud_analytics_runs_total", "Analytics recomputed, by what asked", ["trigger"])


class CentralCloudSettings(ServiceSettings):
    # The console, the analytics API and /prune-runs need 'Authorization: Bearer <token>' or a console
    # session (logged in with the same token); up and the operator generate it.
    api_token: str = Field(min_length=16, validation_alias=AliasChoices("CENTRALCLOUD_API_TOKEN", "api_token"))
    analytics_url: str = Field(validation_alias=AliasChoices("SHARED_QUEUE_ANALYTICS_URL", "analytics_url"))
    retention_days: int = Field(90, ge=1, validation_alias=AliasChoices("SHARED_QUEUE_RETENTION_DAYS"))
    prune_interval_seconds: float = Field(
        3600.0, ge=1, le=86400, validation_alias=AliasChoices("PRUNE_INTERVAL_SECONDS")
    )
    # A full recompute however quiet the archives; a change to them recomputes within the check interval.
    analytics_interval_seconds: float = Field(
        60.0, ge=1, le=86400, validation_alias=AliasChoices("ANALYTICS_INTERVAL_SECONDS")
    )
    archive_check_interval_seconds: float = Field(
        2.0, ge=0.1, le=3600, validation_alias=AliasChoices("ARCHIVE_CHECK_INTERVAL_SECONDS")
    )
    metrics_interval_seconds: float = Field(
        10.0, ge=1, le=3600, validation_alias=AliasChoices("METRICS_INTERVAL_SECONDS")
    )
    queue_sample_retention_hours: float = Field(
        24.0, ge=1, le=90 * 24, validation_alias=AliasChoices("QUEUE_SAMPLE_RETENTION_HOURS")
    )
    # How often the console's page fetches the newest report.
    console_refresh_seconds: float = Field(
        15.0, ge=1, le=3600, validation_alias=AliasChoices("CONSOLE_REFRESH_SECONDS")
    )


class CentralCloudService(Service):
    name = "centralcloud"
    settings: CentralCloudSettings

    def __init__(self, settings: CentralCloudSettings) -> None:
        super().__init__(settings)
        self.layout = StackLayout(settings.singularity_instances, settings.stack_prefix)
        self.store = CentralCloudStore(self.db)
        self.archives = connection_pool(settings.analytics_url, max_size=2, name="centralcloud-analytics")
        self._console = ConsoleLogin(settings.api_token, "centralcloud", "CentralCloud")
        self._learning = asyncio.Lock()
        self._fingerprint: dict[str, str] | None = None  # of the archives the newest report was computed from
        # Dual operation and cutover: the JetStream side of every work queue, made by its owner as pgmq's is.
        self.messaging.on_connect.append(self._ensure_streams)

    async def on_start(self) -> None:
        await self.archives.open()
        created = await asyncio.to_thread(self._ensure_queues)
        log.info("queues checked", extra={"queues_created": created, "queues": len(self.layout.queues)})

    async def stop(self) -> None:
        await super().stop()
        await self.archives.close()

    async def _ensure_streams(self, nc: Client) -> None:
        created = await ensure_streams(nc.jetstream(), self.layout)
        log.info("NATS streams checked", extra={"streams_created": created, "streams": len(self.layout.work_queues)})

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
        if pruned:  # the archives' fingerprint does not see deletions
            await self.learn("prune")
        return pruned

    async def learn(self, trigger: str = "interval") -> dict[str, Any]:
        async with self._learning:
            report = await analytics.report(self.archives)
            await self.store.add_report(report)
            self._fingerprint = report["archives"]
        RECOMPUTED.labels(trigger).inc()
        return report

    async def learn_if_archives_changed(self) -> None:
        """Recompute as soon as something is archived, so the page never lags a decision by a whole interval."""
        if self._learning.locked():
            return
        if await analytics.fingerprint(self.archives) != self._fingerprint:
            await self.learn("archives changed")

    async def observe_queues(self) -> None:
        metrics = await self.queue.metrics_all()
        for m in metrics:
            QUEUE_DEPTH.labels(m.queue).set(m.length)
            QUEUE_VISIBLE.labels(m.queue).set(m.visible)
            OLDEST_AGE.labels(m.queue).set(m.oldest_age_seconds or 0)
        await self.store.record_queue_samples(metrics, self.settings.queue_sample_retention_hours)

    def jobs(self) -> list[Job]:
        s = self.settings
        return [
            lambda stop: every(s.prune_interval_seconds, stop, self.prune, "prune"),
            lambda stop: every(s.analytics_interval_seconds, stop, self.learn, "analytics"),
            lambda stop: every(s.archive_check_interval_seconds, stop, self.learn_if_archives_changed, "archive-check"),
            lambda stop: every(s.metrics_interval_seconds, stop, self.observe_queues, "queue-metrics"),
        ]

    # -- HTTP ------------------------------------------------------------------------------------

    def api_token(self) -> str | None:
        return self.settings.api_token

    def console(self) -> ConsoleLogin:
        return self._console

    async def _analytics(self) -> dict[str, Any]:
        report, computed_at = await self.store.latest_report()
        s = self.settings
        return {
            "computed_at": computed_at,
            "report": report,
            "queues": await self.store.queue_series(),
            "dead_letters": await self.store.dead_letters(),
            "settings": {
                "console_refresh_seconds": s.console_refresh_seconds,
                "analytics_interval_seconds": s.analytics_interval_seconds,
                "archive_check_interval_seconds": s.archive_check_interval_seconds,
                "metrics_interval_seconds": s.metrics_interval_seconds,
                "queue_sample_retention_hours": s.queue_sample_retention_hours,
            },
        }

    async def analytics_json(self, request: Request) -> Response:
        return json_response(await self._analytics())

    async def recompute(self, request: Request) -> Response:
        """POST /analytics/recompute: the report and the queue samples now, then the same answer as GET."""
        body = (await request.body()).strip()
        if body not in (b"", b"{}"):
            return error_response(422, "body: takes no fields (send {} or nothing)")
        await self.learn("on demand")
        await self.observe_queues()
        return json_response(await self._analytics())

    async def console_page(self, request: Request) -> Response:
        return page.console_page()

    async def prune_runs(self, request: Request) -> Response:
        return json_response(await self.store.prune_runs())

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.console_page),
            Route("/analytics", self.analytics_json),
            Route("/analytics/recompute", self.recompute, methods=["POST"]),
            Route("/prune-runs", self.prune_runs),
            Mount(page.STATIC_PREFIX, StaticAssets(page.STATIC), name="centralcloud-static"),
        ]

"""The lifecycle every service shares: pools, consumers woken by NOTIFY, periodic jobs, an HTTP app.

A service subclasses `Service` and declares its routes, consumers and background jobs. The
Starlette app adds `/healthz` (the process is alive), `/readyz` (its database and the shared
queue answer, its listener is connected) and `/metrics` (Prometheus). On shutdown (SIGTERM via
uvicorn) consumers finish the batch in hand for up to the grace period, then hand the rest back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from singularity_stack.provision.budget import PoolSizes, pool_size_for
from singularity_stack.service.body_limit import BodyLimit
from singularity_stack.service.console import LOGIN_PATH, STATIC_PREFIX, ConsoleLogin
from singularity_stack.service.guard import FormRoute, GuardPolicy, RequestGuard
from singularity_stack.service.http import error_response
from singularity_stack.service.messaging import Messaging
from singularity_stack.service.settings import ServiceSettings
from singularity_stack.sharedqueue import Consumer, NotifyListener, SharedQueue
from singularity_stack.sharedqueue.nats_replies import ReplyRouter
from singularity_stack.sharedqueue.pool import connection_pool, short_waits

log = logging.getLogger(__name__)
Job = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
# Served to anyone who reaches the service by an allowed host name: probes and Prometheus carry no token.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method the route does not take) as JSON, like every answer."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        reason = "path: no such route"
    elif exc.status_code == 405:
        reason = f"method: {request.method} is not allowed here"
    else:
        reason = exc.detail
    response = error_response(exc.status_code, reason)
    response.headers.update(exc.headers or {})  # 405's Allow
    return response


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal error")


# How long an HTTP handler waits for a database connection before it answers 503 (see `DatabaseWait`).
HTTP_DB_WAIT_SECONDS = 0.75


async def database_unavailable(request: Request, exc: Exception) -> Response:
    """A database that is down or unreachable (a failed statement, no connection in time): 503 with why."""
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path, exc)
    # The detail (host, port, the server's words) is in the log, not in an answer to a stranger.
    return error_response(503, f"database unavailable ({exc.__class__.__name__}); try again shortly")


class DatabaseWait:
    """ASGI middleware: an HTTP request waits at most HTTP_DB_WAIT_SECONDS for a pool connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with short_waits(HTTP_DB_WAIT_SECONDS):
            await self.app(scope, receive, send)


async def every(seconds: float, stop: asyncio.Event, work: Callable[[], Awaitable[Any]], name: str) -> None:
    """Run `work` now and then every `seconds` until `stop`; a failure is logged and retried next time."""
    while not stop.is_set():
        try:
            await work()
        except Exception:
            log.exception("periodic job %s failed", name)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)


class Service:
    name = "service"

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        size = settings.pool_size or pool_size_for(self.name, PoolSizes())
        self.queue = SharedQueue(settings.shared_queue_url, max_size=size, name=f"{self.name}-shared-queue")
        self.db: AsyncConnectionPool = connection_pool(settings.database_url, max_size=size, name=f"{self.name}-db")
        self.stop_event = asyncio.Event()
        self._consumers: list[Consumer[Any]] = []
        self._listener: NotifyListener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: list[asyncio.Task[None]] = []
        # The NATS side of the migration from NATS (MESSAGING_MODE); nothing in pgmq mode.
        self.messaging = Messaging(settings, self.queue, self.nats_user())

    @property
    def replies(self) -> ReplyRouter:
        """Where a handler sends its reply: back on the path its request came by (NATS or pgmq)."""
        return self.messaging.replies

    def nats_user(self) -> str:
        """The service's NATS user, by logical name (an instance overrides it with its id)."""
        return self.name

    # -- what a service declares -----------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return []

    def api_token(self) -> str | None:
        """The bearer token every route but OPEN_PATHS requires; None: the routes authenticate themselves."""
        return None

    def console(self) -> ConsoleLogin | None:
        """A browser console's login (its pages are among `routes`); None: the service has no console."""
        return None

    def consumers(self) -> list[Consumer[Any]]:
        """Consumers of this service; their `wakeup` events are wired to the NOTIFY listener."""
        return []

    def jobs(self) -> list[Job]:
        """Background jobs, each given the stop event."""
        return []

    async def on_start(self) -> None:
        """Hook run after the pools open and before consumers start."""

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.queue.open()
        await self.db.open()
        await self.on_start()
        self._consumers = self.consumers()
        if self._consumers:
            self._listener = NotifyListener(self.settings.shared_queue_url, [c.queue for c in self._consumers])
            for consumer in self._consumers:
                consumer.wakeup = self._listener.event(consumer.queue)
            self._background.append(asyncio.create_task(self._listener.run(), name="notify-listener"))
        self._tasks = [asyncio.create_task(c.run(self.stop_event), name=f"consume-{c.queue}") for c in self._consumers]
        self._tasks += [asyncio.create_task(job(self.stop_event)) for job in self.jobs()]
        if self.messaging.enabled:
            nats = self.messaging.run(self.stop_event, self._consumers)
            self._tasks.append(asyncio.create_task(nats, name="nats-readers"))
        log.info("%s started", self.name, extra={"consumers": [c.queue for c in self._consumers]})

    async def stop(self) -> None:
        self.stop_event.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=self.settings.shutdown_grace_seconds)
            for task in pending:
                task.cancel()  # a cancelled consumer hands its in-flight messages back at once
            await asyncio.gather(*pending, return_exceptions=True)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.messaging.close()
        await self.queue.close()
        await self.db.close()
        log.info("%s stopped", self.name)

    # -- health ----------------------------------------------------------------------------------

    async def readiness(self) -> dict[str, str]:
        """Check name → problem, for every check that fails (empty: ready)."""
        problems: dict[str, str] = {}

        async def check(name: str, pool: AsyncConnectionPool) -> None:
            try:
                async with pool.connection(timeout=HTTP_DB_WAIT_SECONDS) as conn:
                    await conn.execute("SELECT 1")
            except Exception as error:
                problems[name] = f"{error.__class__.__name__}: {error}"

        await asyncio.gather(check("database", self.db), check("shared_queue", self.queue.pool))  # within a second
        if self._listener and not self._listener.connected.is_set():
            problems["notify_listener"] = "not connected"
        dead = [t.get_name() for t in self._tasks if t.done() and not self.stop_event.is_set()]
        if dead:
            problems["workers"] = "stopped: " + ", ".join(dead)
        return problems

    def details(self) -> dict[str, str]:
        """Facts an operator should see in /readyz, ready or not (e.g. which sandbox bounds are in force)."""
        return {}

    def app(self) -> Starlette:
        async def healthz(request: Request) -> Response:
            return JSONResponse({"status": "alive", "service": self.name})

        async def readyz(request: Request) -> Response:
            problems, details = await self.readiness(), {**self.messaging.details(), **self.details()}
            extra = {"details": details} if details else {}
            if problems:
                return JSONResponse({"status": "not ready", "problems": problems, **extra}, status_code=503)
            return JSONResponse({"status": "ready", "service": self.name, **extra})

        async def metrics(request: Request) -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            await self.start()
            try:
                yield
            finally:
                await self.stop()

        base = [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]
        console = self.console()
        routes = [*base, *(console.routes() if console else []), *self.routes()]
        policy = GuardPolicy(
            allowed_hosts=self.settings.allowed_host_names(),
            api_token=self.api_token(),
            open_paths=OPEN_PATHS | ({LOGIN_PATH, "/logout"} if console else set()),
            open_prefixes=(f"{STATIC_PREFIX}/",) if console else (),
            session=console,
            form_paths=frozenset(route.path for route in routes if isinstance(route, FormRoute)),
        )
        # The guard first (a stranger's body is never read), then the body limit, then the routes.
        middleware = [
            Middleware(RequestGuard, policy=policy),
            Middleware(BodyLimit, max_bytes=self.settings.max_body_bytes),
            Middleware(DatabaseWait),
        ]
        return Starlette(
            routes=routes,
            middleware=middleware,
            lifespan=lifespan,
            exception_handlers={
                HTTPException: http_error,
                psycopg.OperationalError: database_unavailable,
                Exception: server_error,
            },
        )

"""Singularity's browser console: the tasks page, a task's live page, and where a reviewer's card leads.

The pages are static HTML (static/) whose scripts read the JSON API (GET /tasks, GET /tasks/{id},
POST /tasks) with the session cookie of service/console.py, and render every value with textContent.
Only the instance's name and the languages are written into a page, escaped.
"""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from singularity_stack import contract as c
from singularity_stack.service.console import SECURITY_HEADERS, static_page
from singularity_stack.service.http import BadRequest, error_response, path_uuid
from singularity_stack.singularity.store import TaskStore

STATIC = Path(__file__).parent / "static"
TASK_PAGE = "/console/tasks/{task_id}"
# The scripts and style the pages load, by name: nothing else under static/ is served (not the pages' raw HTML).
ASSETS = {
    "console.js": "text/javascript",
    "tasks.js": "text/javascript",
    "task.js": "text/javascript",
    "singularity.css": "text/css",
}


def base_url(value: str, variable: str) -> str:
    """An http(s) URL another console lives at, without a trailing slash; '' when unset."""
    value = value.strip()
    if not value:
        return ""
    parts = urlsplit(value)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        raise ValueError(f"{variable}: must be an http(s) base URL such as http://127.0.0.1:8000, without a query")
    return value.rstrip("/")


def task_page(task_id: object) -> str:
    return TASK_PAGE.format(task_id=task_id)


class TaskConsole:
    def __init__(self, store: TaskStore, instance: str) -> None:
        self.store = store
        self.instance = instance

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.tasks, methods=["GET"]),
            Route(TASK_PAGE, self.task, methods=["GET"]),
            Route("/console/requests/{request_id}", self.request, methods=["GET"]),
            Route("/static/{name}", self.asset, methods=["GET"]),
        ]

    def _page(self, name: str) -> Response:
        languages = "".join(
            f'<option value="{html.escape(lang.value)}">{html.escape(lang.value)}</option>' for lang in c.Language
        )
        return static_page(STATIC / name, replacements={"instance": html.escape(self.instance), "languages": languages})

    async def tasks(self, request: Request) -> Response:
        return self._page("tasks.html")

    async def task(self, request: Request) -> Response:
        try:
            task_id = path_uuid(request, "task_id")
        except BadRequest as bad:
            return bad.response()
        if await self.store.task(task_id) is None:
            return error_response(404, f"task_id: no task {task_id} on {self.instance}")
        return self._page("task.html")

    async def request(self, request: Request) -> Response:
        """A request id (what Nexus knows of a card) → the page of the task that sent it."""
        try:
            request_id = path_uuid(request, "request_id")
        except BadRequest as bad:
            return bad.response()
        task_id = await self.store.task_of_request(request_id)
        if task_id is None:
            return error_response(404, f"request_id: no step of {self.instance} sent request {request_id}")
        return RedirectResponse(task_page(task_id), 303)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        media_type = ASSETS.get(name)
        if media_type is None:
            return error_response(404, "path: no such file")
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": SECURITY_HEADERS["Cache-Control"]}
        return Response((STATIC / name).read_bytes(), media_type=media_type, headers=headers)

"""The reviewers' web UI: one page, a JSON API to decide, and a WebSocket that pushes every change.

Each reviewer logs in with their own token (nexus/reviewers.py: named tokens, stored hashed), presented
either as `Authorization: Bearer <token>` (scripts and WebSocket clients) or once to the login form,
which sets a session cookie. The name recorded with every decision is the one the token belongs to;
nothing the client sends names the reviewer. Nexus's shared UI token logs in as "shared-token", and
only while no named reviewer exists: naming the first reviewer turns it off.

The cookie holds the reviewer's name, when it was issued and an HMAC-SHA256 of both, keyed with the
shared token and the reviewer's current token hash: it never reveals a token, cannot be forged or
extended without both, and lasts SESSION_MAX_AGE. It is checked against the reviewers file at every
request (and before every WebSocket push), so removing a reviewer, or issuing them a new token, ends
their sessions at once. It is HttpOnly and SameSite=Strict, and requests that rely on it are also
refused when their Origin is another site (no cross-site form posts or WebSocket hijacking).

The page is static HTML/CSS/JS (static/) that renders all data with textContent, under a
Content-Security-Policy that forbids inline script: a diff full of HTML stays text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import html
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

import psycopg
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from singularity_stack.nexus.hitl import RESYNC, Card, Event, Hitl, HitlError
from singularity_stack.nexus.reviewers import SHARED_IDENTITY, Reviewers
from singularity_stack.service.console import SESSION_MAX_AGE, StaticAssets, with_session, without_session
from singularity_stack.service.guard import FormRoute
from singularity_stack.service.http import BadRequest, error_response, json_response, parse_body, path_uuid
from singularity_stack.service.text import RequiredText, StorableText
from singularity_stack.sharedqueue import Unavailable

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "nexus_hitl_session"
CLOSE_UNAUTHENTICATED = 4401
CLOSE_CROSS_SITE = 4403

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make Chromium send "Origin: null"
    "Cache-Control": "no-store",
}

ReviewerHandler = Callable[[Request, str], Awaitable[Response]]  # gets the authenticated reviewer
RouteEndpoint = Callable[[Request], Awaitable[Response]]


class Decision(BaseModel):
    # strict: "approved": "yes" must be refused, not read as True
    model_config = ConfigDict(extra="forbid", strict=True)
    approved: bool
    reason: Annotated[StorableText, Field(max_length=10_000)] = ""


class Answer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    response: Annotated[RequiredText, Field(max_length=100_000)]


# -- authentication ---------------------------------------------------------------------------------


class Auth:
    """Who a request is: a named reviewer (their own token), or the shared token's holder."""

    def __init__(self, token: str, reviewers: Reviewers) -> None:
        if not token:
            raise ValueError("the HITL UI needs a non-empty token")
        self._token = token.encode()
        self.reviewers = reviewers

    def shared_allowed(self) -> bool:
        return not self.reviewers.any_named()

    def is_shared_token(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token)

    def identify(self, candidate: str) -> str | None:
        """The identity a presented token proves: a reviewer's name, SHARED_IDENTITY, or None."""
        name = self.reviewers.authenticate(candidate)
        if name is not None:
            return name
        return SHARED_IDENTITY if self.is_shared_token(candidate) and self.shared_allowed() else None

    def _key(self, name: str) -> bytes | None:
        """The session key of `name` as things stand now; None if `name` may not log in."""
        if name == SHARED_IDENTITY:
            return self._token if self.shared_allowed() else None
        stored = self.reviewers.stored_hash(name)
        if stored is None:
            return None
        # The reviewer's current hash is part of the key: a new token or removal invalidates their
        # cookies, and neither the reviewers file (hashes) nor the shared token alone can forge one.
        return hmac.new(self._token, f"nexus-hitl-reviewer\0{stored}".encode(), hashlib.sha256).digest()

    @staticmethod
    def _signature(key: bytes, name: str, issued: int) -> str:
        message = f"nexus-hitl-session\0{issued}\0{name}".encode()
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def session_value(self, name: str, issued: int | None = None) -> str:
        """'<base64url name>.<issued, unix seconds>.<HMAC>': the name is readable, nothing is forgeable."""
        key = self._key(name)
        if key is None:
            raise ValueError(f"{name!r} may not log in")
        issued = int(time.time()) if issued is None else issued
        encoded = base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")
        return f"{encoded}.{issued}.{self._signature(key, name, issued)}"

    def session_name(self, value: str) -> str | None:
        """The reviewer a session cookie belongs to; None if it is not ours, no longer valid or too old."""
        encoded, _, rest = value.partition(".")
        issued_text, _, signature = rest.partition(".")
        try:
            name = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            issued = int(issued_text)
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        key = self._key(name)
        if key is None or not hmac.compare_digest(signature.encode(), self._signature(key, name, issued).encode()):
            return None
        # Enforced here too: the cookie's Max-Age only asks the browser to forget it. A minute of
        # clock skew between Nexus replicas is tolerated.
        age = time.time() - issued
        return name if -60 <= age <= SESSION_MAX_AGE else None

    def reviewer(self, conn: HTTPConnection) -> tuple[str, bool] | None:
        """(reviewer name, via cookie?) for an authenticated request or WebSocket, else None.

        There is no token query parameter: URLs end up in access logs. Scripts send the header.
        """
        scheme, _, credential = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            name = self.identify(credential.strip())
            if name is not None:
                return name, False
        cookie = conn.cookies.get(SESSION_COOKIE)
        name = self.session_name(cookie) if cookie else None
        return (name, True) if name is not None else None


def cross_site(conn: HTTPConnection) -> bool:
    """True when a browser says the request comes from a page of another origin."""
    origin = conn.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != conn.headers.get("host")


# -- pages ------------------------------------------------------------------------------------------


def _page(name: str, status_code: int = 200, error: str = "") -> HTMLResponse:
    text = (STATIC / name).read_text(encoding="utf-8")
    if error:
        text = text.replace("<!--error-->", f'<p class="error" role="alert">{html.escape(error)}</p>')
    return HTMLResponse(text, status_code, headers=SECURITY_HEADERS)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (python-multipart is not a dependency; a login form needs no more)."""
    body = await request.body()  # the service's BodyLimit middleware has capped it while it streamed
    fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
    return {key: values[0] for key, values in fields.items()}


class HitlWeb:
    def __init__(self, hitl: Hitl, token: str, reviewers: Reviewers, console_urls: Mapping[str, str]) -> None:
        self.hitl = hitl
        self.auth = Auth(token, reviewers)
        self.console_urls = dict(console_urls)

    # -- links to the tasks ------------------------------------------------------------------------

    def _linked(self, card: Card) -> Card:
        """The card with `task_url`, the page of the task that sent it, when that instance's console is known.

        Singularity finds the task by the request id (GET /console/requests/{id}), the one thing both know.
        """
        base = self.console_urls.get(card["instance"])
        return card | {"task_url": f"{base}/console/requests/{card['request_id']}"} if base else card

    async def _snapshot(self) -> dict[str, list[Card]]:
        return {kind: [self._linked(c) for c in cards] for kind, cards in (await self.hitl.snapshot()).items()}

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/login", self.login_form, methods=["GET"]),
            # HTML forms; every other POST must be JSON (service/guard.py).
            FormRoute("/login", self.login, methods=["POST"]),
            FormRoute("/logout", self.logout, methods=["POST"]),
            Route("/api/pending", self.api(self.pending), methods=["GET"]),
            Route("/api/approvals/{request_id}", self.api(self.decide), methods=["POST"]),
            Route("/api/questions/{request_id}", self.api(self.answer), methods=["POST"]),
            WebSocketRoute("/ws", self.websocket),
            # Public: the page's code and style hold no data, and the login form needs them.
            Mount("/static", StaticAssets(STATIC, SECURITY_HEADERS), name="hitl-static"),
        ]

    # -- pages -------------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        if self.auth.reviewer(request) is None:
            return RedirectResponse("/login", 303)
        return _page("index.html")

    async def login_form(self, request: Request) -> Response:
        if self.auth.reviewer(request) is not None:
            return RedirectResponse("/", 303)
        return _page("login.html")

    async def login(self, request: Request) -> Response:
        if cross_site(request):
            return _page("login.html", 403, "This login form was posted from another site.")
        try:
            form = await _form(request)
        except BadRequest as bad:
            return _page("login.html", bad.status_code, bad.reason)
        # The token alone says who logs in; a name typed beside it would be a claim, not an identity.
        unknown = sorted(set(form) - {"token"})
        if unknown:
            return _page("login.html", 400, f"{unknown[0]}: not a field of this form; your token says who you are.")
        token = form.get("token", "")
        name = self.auth.identify(token)
        if name is None:
            reason = (
                "token: the shared UI token is off while named reviewers exist; log in with your own token."
                if self.auth.is_shared_token(token)
                else "token: wrong token; use your reviewer token (or the UI token Nexus was started with)."
            )
            return _page("login.html", 401, reason)
        return with_session(request, "/", SESSION_COOKIE, self.auth.session_value(name))

    async def logout(self, request: Request) -> Response:
        return without_session("/login", SESSION_COOKIE)

    # -- API ---------------------------------------------------------------------------------------

    def api(self, handler: ReviewerHandler) -> RouteEndpoint:
        """Authenticate (401 JSON), refuse cross-site cookie use (403), map errors to their statuses."""

        async def endpoint(request: Request) -> Response:
            reviewer = self.auth.reviewer(request)
            if reviewer is None:
                response = error_response(
                    401, "authorization: not authenticated: send 'Authorization: Bearer <token>' or log in"
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
            name, via_cookie = reviewer
            if via_cookie and request.method != "GET" and cross_site(request):
                return error_response(403, "cross-site request refused")
            try:
                return await handler(request, name)
            except BadRequest as bad:
                return bad.response()
            except HitlError as error:
                return error_response(error.status_code, error.reason)
            except (psycopg.OperationalError, Unavailable) as error:
                # The decision was rolled back (see Hitl._settle): the reviewer can simply retry.
                log.warning("HITL decision failed: %s", error)
                return error_response(
                    503, "Nexus could not reach its database or the shared queue; nothing was decided"
                )

        return endpoint

    async def pending(self, request: Request, reviewer: str) -> Response:
        return json_response(await self._snapshot())

    async def decide(self, request: Request, reviewer: str) -> Response:
        request_id = path_uuid(request, "request_id")
        body = await parse_body(request, Decision)
        await self.hitl.decide(request_id, body.approved, body.reason, reviewer)
        return json_response({"request_id": request_id, "state": "approved" if body.approved else "rejected"})

    async def answer(self, request: Request, reviewer: str) -> Response:
        request_id = path_uuid(request, "request_id")
        body = await parse_body(request, Answer)
        await self.hitl.answer(request_id, body.response, reviewer)
        return json_response({"request_id": request_id, "state": "answered"})

    # -- push --------------------------------------------------------------------------------------

    async def websocket(self, websocket: WebSocket) -> None:
        """Snapshot on connect, then every 'added' / 'removed' event. Browsers act through the POST API."""
        reviewer = self.auth.reviewer(websocket)
        await websocket.accept()
        # Accept first, then close with a code: the page can tell "log in again" from a network error.
        if reviewer is None:
            await websocket.close(CLOSE_UNAUTHENTICATED, "not authenticated")
            return
        if reviewer[1] and cross_site(websocket):
            await websocket.close(CLOSE_CROSS_SITE, "cross-site WebSocket refused")
            return
        # Subscribe before reading the snapshot: nothing committed in between is missed (the page
        # ignores an 'added' it already has and a 'removed' it never had).
        with self.hitl.broadcaster.subscribe() as inbox:
            await self._send_snapshot(websocket, reviewer[0])
            pump = asyncio.create_task(self._pump(websocket, inbox))
            try:
                await self._drain(websocket)
            finally:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump

    async def _send_snapshot(self, websocket: WebSocket, reviewer: str) -> None:
        await websocket.send_json({"type": "snapshot", **await self._snapshot(), "reviewer": reviewer})

    async def _pump(self, websocket: WebSocket, inbox: asyncio.Queue[Event]) -> None:
        try:
            while True:
                event = await inbox.get()
                # Asked again before every push: a reviewer removed meanwhile is sent nothing more.
                reviewer = self.auth.reviewer(websocket)
                if reviewer is None:
                    await websocket.close(CLOSE_UNAUTHENTICATED, "no longer authenticated")
                    return
                if event is RESYNC:
                    await self._send_snapshot(websocket, reviewer[0])
                elif "card" in event:  # shared by every subscriber: linked in a copy
                    await websocket.send_json(event | {"card": self._linked(event["card"])})
                else:
                    await websocket.send_json(event)
        except (WebSocketDisconnect, RuntimeError, OSError) as error:
            log.debug("WebSocket send stopped: %s", error)  # the client went away; _drain sees it too

    async def _drain(self, websocket: WebSocket) -> None:
        """Read until the client disconnects; it has nothing to say (pings are answered by the server)."""
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass


def hitl_routes(hitl: Hitl, token: str, reviewers: Reviewers, console_urls: Mapping[str, str]) -> list[BaseRoute]:
    return HitlWeb(hitl, token, reviewers, console_urls).routes()

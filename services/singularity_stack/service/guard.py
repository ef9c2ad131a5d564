"""An ASGI middleware every service's HTTP and WebSocket entry points go through.

Every request is treated as coming from a stranger's browser. In order, it is refused when:

1. its Host is not one the service is configured for (DNS rebinding: a hostile name resolving to
   us) — 400;
2. a browser says it comes from a page of another origin (`Origin` not ours, or `Sec-Fetch-Site`
   cross-site / same-site for anything but a top-level navigation) — 403;
3. the service has an API token and the request is not for an open path and lacks
   `Authorization: Bearer <token>` or a valid console session cookie (console.py) — 401, or for a
   browser's page load a redirect to the login form; a request that relies on the cookie and could
   change something must also carry our own Origin — 403;
4. it could change something (not GET/HEAD/OPTIONS) and is not `application/json` (forms only on
   paths that declare them, e.g. the HITL login) — 415: "simple" cross-site requests
   (text/plain, forms) never reach a handler.

A refused WebSocket handshake is closed before it is accepted (the client sees HTTP 403).
Every refusal is a JSON body naming the reason.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from singularity_stack.service.http import error_response

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
CLOSE_POLICY_VIOLATION = 1008
PORT = re.compile(r"[0-9]{1,5}")


class FormRoute(Route):
    """A route whose unsafe requests may be an urlencoded HTML form instead of JSON (e.g. a login form)."""


class SessionCheck(Protocol):
    """A browser session cookie a service accepts in place of its bearer token (console.ConsoleLogin)."""

    login_path: str

    def cookie_name(self, host_header: str) -> str: ...

    def valid(self, value: str) -> bool: ...


@dataclass(frozen=True)
class GuardPolicy:
    # Host names (lower case, no port) the service answers to; "*" answers to any, "*.example" to subdomains.
    allowed_hosts: frozenset[str]
    # When set, every path but `open_paths` needs `Authorization: Bearer <api_token>`.
    api_token: str | None = None
    open_paths: frozenset[str] = field(default_factory=frozenset)
    open_prefixes: tuple[str, ...] = ()  # e.g. a console's static files: no data in them
    session: SessionCheck | None = None
    form_paths: frozenset[str] = field(default_factory=frozenset)


def split_host(value: str) -> tuple[str, int | None]:
    """'Example.org:8000' → ('example.org', 8000); '[::1]:80' → ('::1', 80); a bad port → (host, -1)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    if not port_text:
        return host, None
    # ASCII digits only, and a real port: str.isdigit() also takes '²' (int() then raises), and a
    # thousands-digit port would hit int()'s limit. Either would be a 500 instead of a 400.
    if not PORT.fullmatch(port_text) or int(port_text) > 65535:
        return host, -1
    return host, int(port_text)


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    if "*" in allowed or host in allowed:
        return True
    return any(pattern.startswith("*.") and host.endswith(pattern[1:]) for pattern in allowed)


def same_origin(origin: str, host_header: str, scheme: str) -> bool:
    """Does a browser's Origin name the host and port this request was sent to? ('null' never does.)"""
    parts = urlsplit(origin)
    if parts.scheme not in DEFAULT_PORTS or not parts.netloc:
        return False
    origin_host, origin_port = split_host(parts.netloc)
    host, port = split_host(host_header)
    # The scheme is not compared: behind a TLS-terminating proxy the service itself sees http.
    return (origin_host, origin_port or DEFAULT_PORTS[parts.scheme]) == (host, port or DEFAULT_PORTS.get(scheme, 80))


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").partition(";")[0].strip().lower()


class RequestGuard:
    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope, Headers(scope=scope))
        if refusal is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION})
        else:
            await refusal(scope, receive, send)

    def refusal(self, scope: Scope, headers: Headers) -> Response | None:
        """The response that refuses this request, or None when it may go on."""
        host_header = headers.get("host", "")
        host, port = split_host(host_header)
        if not host or port == -1 or not host_allowed(host, self.policy.allowed_hosts):
            return error_response(400, "host: this service does not answer to that Host header")
        origin = headers.get("origin")
        if origin is not None and not same_origin(origin, host_header, scope.get("scheme", "http")):
            return error_response(403, "origin: cross-origin requests are refused")
        method = scope.get("method", "GET")
        site = headers.get("sec-fetch-site", "same-origin")
        navigation = method in ("GET", "HEAD") and headers.get("sec-fetch-mode") == "navigate"
        if site in ("cross-site", "same-site") and not navigation:
            return error_response(403, "sec-fetch-site: requests from other sites are refused")
        path = scope.get("path", "")
        if self.policy.api_token and not self._open(path) and not self._authorized(headers):
            session = self.policy.session
            if session is None or not self._session_valid(session, headers, host_header):
                return self._unauthenticated(method, headers)
            if method not in SAFE_METHODS and origin is None:
                # The cookie rides along with any request a browser makes; our own pages always say where from.
                return error_response(403, "origin: a request relying on the session cookie must carry Origin")
        if scope["type"] == "http" and method not in SAFE_METHODS:
            accepted = {JSON, FORM} if path in self.policy.form_paths else {JSON}
            if media_type(headers) not in accepted:
                return error_response(415, f"content-type: must be {' or '.join(sorted(accepted))}")
        return None

    def _open(self, path: str) -> bool:
        return path in self.policy.open_paths or path.startswith(self.policy.open_prefixes)

    @staticmethod
    def _session_valid(session: SessionCheck, headers: Headers, host_header: str) -> bool:
        value = cookie_parser(headers.get("cookie", "")).get(session.cookie_name(host_header))
        return value is not None and session.valid(value)

    def _unauthenticated(self, method: str, headers: Headers) -> Response:
        page_load = method in ("GET", "HEAD") and (
            headers.get("sec-fetch-mode") == "navigate" or "text/html" in headers.get("accept", "")
        )
        if page_load and self.policy.session is not None:
            return RedirectResponse(self.policy.session.login_path, 303)
        response = error_response(401, "authorization: send 'Authorization: Bearer <API token>'")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def _authorized(self, headers: Headers) -> bool:
        assert self.policy.api_token
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode(), self.policy.api_token.encode()
        )

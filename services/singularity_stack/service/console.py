"""Browser consoles of services that are otherwise API-only: log in once with the API token, then a cookie.

A browser cannot attach `Authorization: Bearer` to a page load, so a console (Singularity's tasks page,
CentralCloud's charts) lets a person paste the service's API token into a login form once. The answer is
a session cookie: '<issued, unix seconds>.<HMAC-SHA256>' keyed with the token, so it never reveals the
token, cannot be forged or extended without it, and stops working when the token changes. It is
HttpOnly and SameSite=Strict, and the request guard (guard.py) accepts it only for same-origin requests:
every request that relies on it and could change something must carry our own Origin.

The cookie's name carries the service and the port it was issued on: browsers share cookies between
the ports of one host, and two consoles on localhost must not log each other out.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import re
import time
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from singularity_stack.service.guard import FormRoute, split_host

STATIC = Path(__file__).parent / "console_static"
STATIC_PREFIX = "/console/static"
LOGIN_PATH = "/login"
SESSION_MAX_AGE = 12 * 3600
ISSUED = re.compile(r"[0-9]{1,12}")

# Static pages and scripts only: no inline script, so text from a task or a queue can never run.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make Chromium send "Origin: null"
    "Cache-Control": "no-store",
}


class StaticAssets(StaticFiles):
    """Static files under the consoles' headers: a raw page served from here gets the CSP and frame-ancestors
    too (StaticFiles alone sends none), and a script or stylesheet is never sniffed into something else."""

    def __init__(self, directory: Path, headers: Mapping[str, str] = SECURITY_HEADERS) -> None:
        super().__init__(directory=directory)
        self.security_headers = dict(headers)

    def file_response(
        self, full_path: PathLike[str] | str, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(self.security_headers)
        return response


def static_page(path: Path, status_code: int = 200, replacements: dict[str, str] | None = None) -> HTMLResponse:
    """A console page from a file, with `<!--name-->` markers replaced by already-escaped HTML."""
    text = path.read_text(encoding="utf-8")
    for marker, value in (replacements or {}).items():
        text = text.replace(f"<!--{marker}-->", value)
    return HTMLResponse(text, status_code, headers=SECURITY_HEADERS)


def with_session(request: Request, location: str, cookie: str, value: str) -> Response:
    """A redirect after a login: the session cookie every console (and Nexus's review page) sets."""
    response = RedirectResponse(location, 303)
    response.set_cookie(
        cookie,
        value,
        max_age=SESSION_MAX_AGE,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


def without_session(location: str, cookie: str) -> Response:
    """A redirect after a logout: the session cookie is dropped."""
    response = RedirectResponse(location, 303)
    response.delete_cookie(cookie, httponly=True, samesite="strict")
    return response


class ConsoleLogin:
    """The login form, the session cookie it sets, and the check the request guard makes of that cookie."""

    def __init__(self, token: str, service: str, title: str, landing: str = "/") -> None:
        if len(token) < 16:
            raise ValueError("a console needs the service's API token (16 characters or more)")
        self._token = token.encode()
        self._key = hmac.new(self._token, b"singularity-stack console session", hashlib.sha256).digest()
        self.service = re.sub(r"[^a-z0-9_]", "_", service.lower())
        self.title = title
        self.landing = landing
        self.login_path = LOGIN_PATH

    # -- the cookie ----------------------------------------------------------------------------------

    def cookie_name(self, host_header: str) -> str:
        _, port = split_host(host_header)
        return f"{self.service}_{port or 'default'}_console"

    def _signature(self, issued: int) -> str:
        return hmac.new(self._key, f"{self.service}\0{issued}".encode(), hashlib.sha256).hexdigest()

    def session_value(self, issued: int | None = None) -> str:
        issued = int(time.time()) if issued is None else issued
        return f"{issued}.{self._signature(issued)}"

    def valid(self, value: str) -> bool:
        issued_text, _, signature = value.partition(".")
        # ASCII digits, a sane length: '²'.isdigit() is true and int() of it (or of 5000 digits) raises.
        if not ISSUED.fullmatch(issued_text) or not hmac.compare_digest(
            signature.encode(), self._signature(int(issued_text)).encode()
        ):
            return False
        # Enforced here too: Max-Age only asks the browser to forget the cookie. A minute of skew is fine.
        age = time.time() - int(issued_text)
        return -60 <= age <= SESSION_MAX_AGE

    def authenticated(self, request: Request) -> bool:
        value = request.cookies.get(self.cookie_name(request.headers.get("host", "")))
        return value is not None and self.valid(value)

    # -- routes ----------------------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        return [
            Route(LOGIN_PATH, self.login_form, methods=["GET"]),
            FormRoute(LOGIN_PATH, self.login, methods=["POST"]),
            FormRoute("/logout", self.logout, methods=["POST"]),
            # Public: style and code hold no data, and the login form needs them.
            Mount(STATIC_PREFIX, StaticAssets(STATIC), name="console-static"),
        ]

    def _login_page(self, status_code: int = 200, error: str = "") -> HTMLResponse:
        message = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
        return static_page(STATIC / "login.html", status_code, {"title": html.escape(self.title), "error": message})

    async def login_form(self, request: Request) -> Response:
        if self.authenticated(request):
            return RedirectResponse(self.landing, 303)
        return self._login_page()

    async def login(self, request: Request) -> Response:
        body = await request.body()  # BodyLimit has capped it while it streamed
        fields = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        unknown = sorted(set(fields) - {"token"})
        if unknown:
            return self._login_page(400, f"{unknown[0]}: not a field of this form")
        token = fields.get("token", [""])[0].strip()
        if not hmac.compare_digest(token.encode(), self._token):
            return self._login_page(401, "token: wrong token; use this service's API token")
        return with_session(
            request, self.landing, self.cookie_name(request.headers.get("host", "")), self.session_value()
        )

    async def logout(self, request: Request) -> Response:
        return without_session(LOGIN_PATH, self.cookie_name(request.headers.get("host", "")))

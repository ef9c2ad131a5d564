"""The consoles' login (service/console.py) through the request guard: a token once, then a cookie."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from singularity_stack.service.console import LOGIN_PATH, STATIC_PREFIX, ConsoleLogin
from singularity_stack.service.guard import FormRoute, GuardPolicy, RequestGuard

TOKEN = "t" * 24
HOST = "console.test:8123"
ORIGIN = f"http://{HOST}"


async def data(request: Request) -> Response:
    return JSONResponse({"secret": "tasks"})


def app_with(console: ConsoleLogin) -> Starlette:
    routes = [Route("/ui", data), Route("/api/change", data, methods=["POST"]), *console.routes()]
    policy = GuardPolicy(
        allowed_hosts=frozenset({"console.test"}),
        api_token=TOKEN,
        open_paths=frozenset({LOGIN_PATH, "/logout"}),
        open_prefixes=(f"{STATIC_PREFIX}/",),
        session=console,
        form_paths=frozenset(r.path for r in routes if isinstance(r, FormRoute)),
    )
    return Starlette(routes=routes, middleware=[Middleware(RequestGuard, policy=policy)])


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = app_with(ConsoleLogin(TOKEN, "singularity_1", "Singularity 1", landing="/ui"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=ORIGIN) as http:
        yield http


async def log_in(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await client.post(LOGIN_PATH, data={"token": token}, headers={"origin": ORIGIN})


async def test_a_page_load_without_a_session_goes_to_the_login_form_and_an_api_call_gets_401(client):
    page = await client.get("/ui", headers={"sec-fetch-mode": "navigate", "accept": "text/html"})
    assert (page.status_code, page.headers["location"]) == (303, LOGIN_PATH)
    api = await client.get("/ui")
    assert api.status_code == 401 and "authorization" in api.json()["error"]
    form = await client.get(LOGIN_PATH)
    assert form.status_code == 200 and 'name="token"' in form.text and "Singularity 1" in form.text
    assert "script-src 'self'" in form.headers["content-security-policy"]
    css = await client.get(f"{STATIC_PREFIX}/console.css")
    assert css.status_code == 200 and "--accent" in css.text


async def test_the_token_logs_in_once_and_the_cookie_then_opens_the_pages(client):
    wrong = await log_in(client, "w" * 24)
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert not client.cookies
    right = await log_in(client)
    assert (right.status_code, right.headers["location"]) == (303, "/ui")
    set_cookie = right.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    assert TOKEN not in right.headers["set-cookie"]  # the cookie never carries the token
    assert (await client.get("/ui")).json() == {"secret": "tasks"}
    # Logged in, the login form sends the browser on to the console.
    assert (await client.get(LOGIN_PATH)).headers["location"] == "/ui"
    out = await client.post("/logout", headers={"origin": ORIGIN, "content-type": "application/x-www-form-urlencoded"})
    assert out.status_code == 303
    assert (await client.get("/ui")).status_code == 401


async def test_a_change_relying_on_the_cookie_needs_our_own_origin(client):
    await log_in(client)
    missing = await client.post("/api/change", json={})
    assert missing.status_code == 403 and "origin" in missing.json()["error"]
    foreign = await client.post("/api/change", json={}, headers={"origin": "http://evil.test"})
    assert foreign.status_code == 403
    ours = await client.post("/api/change", json={}, headers={"origin": ORIGIN})
    assert ours.status_code == 200
    # A bearer token needs no Origin: scripts are not browsers.
    client.cookies.clear()
    bearer = await client.post("/api/change", json={}, headers={"authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200


async def test_forged_old_foreign_and_other_port_cookies_are_refused(client):
    console = ConsoleLogin(TOKEN, "singularity_1", "Singularity 1")
    name = console.cookie_name(HOST)
    other_token = ConsoleLogin("x" * 24, "singularity_1", "Singularity 1")
    other_service = ConsoleLogin(TOKEN, "singularity_2", "Singularity 2")
    issued = int(time.time())
    refused = {
        "forged": f"{issued}.{'0' * 64}",
        "expired": console.session_value(issued - 13 * 3600),
        "signed with another token": other_token.session_value(),
        "another service's": other_service.session_value(),
        "garbage": "not-a-session",
    }
    for what, value in refused.items():
        client.cookies.set(name, value, domain="console.test")
        assert (await client.get("/ui")).status_code == 401, what
        client.cookies.clear()
    # The same valid value under another port's cookie name does not count here.
    client.cookies.set(console.cookie_name("console.test:9999"), console.session_value(), domain="console.test")
    assert (await client.get("/ui")).status_code == 401
    client.cookies.set(name, console.session_value(), domain="console.test")
    assert (await client.get("/ui")).status_code == 200


async def test_the_login_form_takes_only_a_token(client):
    extra = await client.post(LOGIN_PATH, data={"token": TOKEN, "name": "admin"}, headers={"origin": ORIGIN})
    assert extra.status_code == 400 and "name: not a field" in extra.text
    cross = await client.post(LOGIN_PATH, data={"token": TOKEN}, headers={"origin": "http://evil.test"})
    assert cross.status_code == 403 and not client.cookies

"""The consoles attacked as a stranger's browser and a hostile API caller would (service/console.py, guard.py).

Each service runs as its own real process (`singularity-stack run`, uvicorn) on a provisioned stack; the
tests speak raw HTTP to it (a socket where httpx would refuse to send the bytes) and check what comes back.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest
from live_services import CENTRALCLOUD_TOKEN, NEXUS_TOKEN, SINGULARITY_TOKEN, LiveService, live_service
from playwright.async_api import Browser, BrowserContext, async_playwright, expect
from support import CHROMIUM, CHROMIUM_ARGS
from test_cross_origin_browser import AttackPages, fetch_attempts, run_attack

from singularity_stack.provision.provisioner import ProvisionResult


@pytest.fixture(scope="module")
def stack(provision_stack) -> ProvisionResult:
    return provision_stack(1)


@pytest.fixture(scope="module")
def singularity(stack: ProvisionResult) -> Iterator[LiveService]:
    with live_service(stack, "singularity_1") as service:
        yield service


@pytest.fixture(scope="module")
def centralcloud(stack: ProvisionResult) -> Iterator[LiveService]:
    with live_service(stack, "centralcloud") as service:
        yield service


@pytest.fixture(scope="module")
def nexus(stack: ProvisionResult) -> Iterator[LiveService]:
    with live_service(stack, "nexus") as service:
        yield service


TOKENS = {"singularity": SINGULARITY_TOKEN, "centralcloud": CENTRALCLOUD_TOKEN, "nexus": NEXUS_TOKEN}
CONSOLES = ["singularity", "centralcloud"]
PAGE = {"accept": "text/html", "sec-fetch-mode": "navigate"}


def raw(service: LiveService, head: bytes) -> tuple[int, bytes]:
    """Send one request's head as bytes; (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as conn:
        conn.sendall(head + b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def logged_in(service: LiveService, name: str) -> httpx.Client:
    client = httpx.Client(base_url=service.url)
    response = client.post("/login", data={"token": TOKENS[name]}, headers={"origin": service.url})
    assert response.status_code == 303, response.text
    return client


def task_count(stack: ProvisionResult) -> int:
    with psycopg.connect(stack.credentials["singularity_1"].database_url) as conn:
        (count,) = conn.execute("SELECT count(*) FROM tasks").fetchone()  # type: ignore[misc]
        return int(count)


# -- hostile bytes where the guard parses numbers -------------------------------------------------------

# '²' is a digit to str.isdigit() but not to int(); 5000 digits pass isdigit() and exceed int()'s limit.
HOSTILE_NUMBERS = [b"\xb2", b"9" * 5000]


@pytest.mark.parametrize("port", HOSTILE_NUMBERS, ids=["superscript-two", "5000-digits"])
@pytest.mark.parametrize("name", [*CONSOLES, "nexus"])
def test_a_host_header_with_a_hostile_port_is_a_400_naming_the_host(request, name: str, port: bytes) -> None:
    service: LiveService = request.getfixturevalue(name)
    status, body = raw(service, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:" + port + b"\r\n")
    assert status == 400 and b'"host: ' in body, body[:200]


@pytest.mark.parametrize("issued", HOSTILE_NUMBERS, ids=["superscript-two", "5000-digits"])
@pytest.mark.parametrize("name", CONSOLES)
def test_a_session_cookie_with_a_hostile_issue_time_is_no_session(request, name: str, issued: bytes) -> None:
    """Not a 500: the API says 401 and a page load goes to the login form, as for any cookie that is not ours."""
    service: LiveService = request.getfixturevalue(name)
    cookie = f"{'singularity_1' if name == 'singularity' else name}_{service.port}_console".encode()
    head = b"Host: 127.0.0.1:%d\r\nCookie: %s=%s.%s\r\n" % (service.port, cookie, issued, b"0" * 64)
    status, body = raw(service, b"GET / HTTP/1.1\r\n" + head)
    assert status == 401 and b"authorization" in body, body[:200]
    status, _ = raw(service, b"GET / HTTP/1.1\r\nAccept: text/html\r\nSec-Fetch-Mode: navigate\r\n" + head)
    assert status == 303


# -- static files: the consoles' headers everywhere, and nothing outside their directories ----------------


def assert_console_headers(response: httpx.Response) -> None:
    assert response.status_code == 200, (response.url, response.text[:200])
    policy = response.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy, (response.url, policy)
    assert response.headers.get("x-content-type-options") == "nosniff", response.url


@pytest.mark.parametrize("name", CONSOLES)
def test_the_login_forms_raw_file_is_served_under_the_consoles_policy(request, name: str) -> None:
    """/console/static/ is public: its raw login.html must not be a frameable copy of the login form."""
    service: LiveService = request.getfixturevalue(name)
    for path in ("/console/static/login.html", "/console/static/console.css"):
        assert_console_headers(httpx.get(service.url + path))


def test_centralclouds_static_files_are_served_under_the_consoles_policy(centralcloud: LiveService) -> None:
    client = logged_in(centralcloud, "centralcloud")
    for path in ("/static/index.html", "/static/centralcloud.js", "/static/vendor/chart.umd.min.js"):
        assert_console_headers(client.get(path))


def test_nexuss_public_static_pages_cannot_be_framed(nexus: LiveService) -> None:
    """Nexus's /static/ needs no login; its login.html and index.html must not be frameable (clickjacking)."""
    for path in ("/static/login.html", "/static/index.html", "/static/hitl.js", "/static/favicon.svg"):
        assert_console_headers(httpx.get(nexus.url + path))


TRAVERSALS = [
    "/console/static/../console.py",
    "/console/static/%2e%2e/console.py",
    "/console/static/..%2fconsole.py",
    "/console/static/%2e%2e%2f%2e%2e%2fsingularity/service.py",
    "/console/static//etc/passwd",
    "/static/../console.py",
    "/static/%2e%2e%2fservice.py",
    "/static/..%2f..%2fservice%2fconsole.py",
    "/static/%2fetc%2fpasswd",
]


@pytest.mark.parametrize("name", [*CONSOLES, "nexus"])
def test_static_paths_never_leave_their_directories(request, name: str) -> None:
    service: LiveService = request.getfixturevalue(name)
    client = logged_in(service, name) if name in CONSOLES else httpx.Client(base_url=service.url)
    for path in TRAVERSALS:
        response = client.get(path)
        assert response.status_code in (401, 404), (path, response.status_code)
        assert response.headers["content-type"].startswith("application/json"), path
        assert "import" not in response.text and "root:" not in response.text, path
    # Singularity serves its scripts by name only: not its pages' raw HTML.
    if name == "singularity":
        assert client.get("/static/tasks.html").status_code == 404


def test_the_consoles_refusals_are_json_naming_the_field(singularity: LiveService, centralcloud: LiveService) -> None:
    client = logged_in(singularity, "singularity")
    nobody = "00000000-0000-4000-8000-000000000000"
    for path, status, field in (
        (f"/tasks/{nobody}", 404, "task_id: "),  # what a task page's script reads
        (f"/console/tasks/{nobody}", 404, "task_id: "),
        (f"/console/requests/{nobody}", 404, "request_id: "),
        ("/static/nope.js", 404, "path: "),
        ("/console/static/nope.css", 404, "path: "),
    ):
        response = client.get(path)
        assert response.status_code == status and response.json()["error"].startswith(field), (path, response.text)
    wrong_method = client.put("/tasks", json={}, headers={"origin": singularity.url})
    assert wrong_method.status_code == 405 and wrong_method.json()["error"].startswith("method: ")
    page = logged_in(centralcloud, "centralcloud").post("/", json={}, headers={"origin": centralcloud.url})
    assert page.status_code == 405 and page.json()["error"].startswith("method: ")


# -- CSRF: a change relying on the cookie needs our own Origin, whatever else it carries -----------------

FOREIGN = [
    ({}, 403),  # no Origin at all: a browser always sends one on a change, so this is not our page
    ({"origin": "null"}, 403),
    ({"origin": "http://evil.example"}, 403),
    ({"sec-fetch-site": "cross-site"}, 403),
    ({"sec-fetch-site": "same-site"}, 403),  # another port of the same host is the same site
]


@pytest.mark.parametrize(("headers", "status"), FOREIGN)
def test_a_task_cannot_be_created_with_the_cookie_from_elsewhere(stack, singularity, headers, status) -> None:
    client = logged_in(singularity, "singularity")
    before = task_count(stack)
    response = client.post("/tasks", json={"description": "forged"}, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"].startswith(("origin: ", "sec-fetch-site: "))
    other_port = singularity.url.rsplit(":", 1)[0] + ":1"  # another service on this host: same site, not us
    assert client.post("/tasks", json={"description": "forged"}, headers={"origin": other_port}).status_code == 403
    # A form or text/plain from our own origin is still no task.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = client.post(
            "/tasks",
            content=b'{"description": "forged"}',
            headers={"origin": singularity.url, "content-type": content_type},
        )
        assert response.status_code == 415 and "content-type" in response.json()["error"]
    assert task_count(stack) == before


@pytest.mark.parametrize(("headers", "status"), FOREIGN)
def test_recompute_and_logout_refuse_other_origins(centralcloud: LiveService, headers, status) -> None:
    client = logged_in(centralcloud, "centralcloud")
    response = client.post("/analytics/recompute", json={}, headers=headers)
    assert response.status_code == status, response.text
    if not headers:
        return  # logout without any Origin is a script's: it can only end a session it holds itself
    form = {"content-type": "application/x-www-form-urlencoded", **headers}
    assert client.post("/logout", content=b"", headers=form).status_code == status
    assert client.get("/analytics").status_code == 200  # still logged in: the forged logout did nothing


# -- in a real Chromium, logged in to both consoles, pages of other origins attack them ----------------------


def on_demand_recomputes(centralcloud: LiveService) -> float:
    for line in httpx.get(f"{centralcloud.url}/metrics").text.splitlines():
        if line.startswith('centralcloud_analytics_runs_total{trigger="on demand"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"MISSING TOOL: {CHROMIUM} not found — apt-get install chromium")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture(scope="module")
def attackers() -> Iterator[list[AttackPages]]:
    pages = [AttackPages("127.0.0.2"), AttackPages("127.0.0.1")]  # another site; the same site, another port
    yield pages
    for attacker in pages:
        attacker.close()


async def console_user(browser: Browser, *services: tuple[LiveService, str]) -> BrowserContext:
    """A browser logged in to each console through its form: the session cookies are in the jar."""
    context = await browser.new_context()
    page = await context.new_page()
    for service, name in services:
        await page.goto(service.url + "/login")
        await page.fill("#token", TOKENS[name])
        await page.click("button[type=submit]")
        await expect(page).to_have_url(service.url + "/")
    await page.close()
    return context


async def still_logged_in(context: BrowserContext, service: LiveService, path: str) -> bool:
    page = await context.new_page()
    await page.goto(service.url + "/")  # our own page, asking as the console's scripts do
    status = await page.evaluate(f"fetch({json.dumps(path)}).then(r => r.status)")
    await page.close()
    return bool(status == 200)


async def test_other_origins_cannot_use_the_console_sessions(
    stack, singularity: LiveService, centralcloud: LiveService, browser: Browser, attackers: list[AttackPages]
) -> None:
    context = await console_user(browser, (singularity, "singularity"), (centralcloud, "centralcloud"))
    tasks, recomputes = task_count(stack), on_demand_recomputes(centralcloud)
    logout_forms = f"""
      for (const action of {json.dumps([singularity.url + "/logout", centralcloud.url + "/logout"])}) {{
        const frame = document.createElement("iframe"); frame.name = "out" + action.length;
        document.body.append(frame);
        const loaded = new Promise(resolve => frame.onload = resolve);
        const form = Object.assign(document.createElement("form"), {{method: "POST", action, target: frame.name}});
        document.body.append(form); form.submit();
        await Promise.race([loaded, new Promise(r => setTimeout(r, 5000))]);
      }}
      try {{ const r = await fetch({json.dumps(singularity.url + "/tasks")}, {{credentials: "include"}});
             results.read = r.status + ":" + (await r.text()).slice(0, 100); }}
      catch (e) {{ results.read = "blocked"; }}
    """
    for attacker in attackers:
        for target, body in (
            (f"{singularity.url}/tasks", {"description": "csrf"}),
            (f"{centralcloud.url}/analytics/recompute", {}),
        ):
            results = await run_attack(context, attacker.put(fetch_attempts(target, body, "x")))
            assert results["json_include"] == "blocked", (attacker.origin, results)
        results = await run_attack(context, attacker.put(logout_forms))
        assert results["read"] == "blocked", (attacker.origin, results)  # no CORS: the list stays unread
    assert task_count(stack) == tasks
    assert on_demand_recomputes(centralcloud) == recomputes
    # The forged logouts ended nothing.
    assert await still_logged_in(context, singularity, "/tasks")
    assert await still_logged_in(context, centralcloud, "/analytics")
    await context.close()


async def test_no_console_page_can_be_framed_by_another_origin(
    singularity: LiveService, centralcloud: LiveService, nexus: LiveService, browser: Browser, attackers
) -> None:
    """Clickjacking: every page (the raw static copies too) refuses to render in another origin's frame."""
    context = await console_user(browser, (singularity, "singularity"), (centralcloud, "centralcloud"))
    targets = [
        singularity.url + "/",
        singularity.url + "/login",
        singularity.url + "/console/static/login.html",
        centralcloud.url + "/",
        centralcloud.url + "/static/index.html",
        centralcloud.url + "/console/static/login.html",
        nexus.url + "/login",
        nexus.url + "/static/login.html",
        nexus.url + "/static/index.html",
    ]
    script = f"""
      for (const src of {json.dumps(targets)}) {{
        const frame = Object.assign(document.createElement("iframe"), {{src}});
        const loaded = new Promise(resolve => frame.onload = resolve);
        document.body.append(frame);
        await Promise.race([loaded, new Promise(r => setTimeout(r, 5000))]);
      }}
    """
    for attacker in attackers:
        page = await context.new_page()
        await page.goto(attacker.put(script))
        await page.wait_for_function("window.done === true", timeout=30_000)
        framed = [f for f in page.frames if f is not page.main_frame]
        assert len(framed) == len(targets)
        for frame in framed:
            # A refused frame holds Chromium's error page: none of the console's own markup.
            rendered = await frame.evaluate("document.querySelector('link[href^=\"/console/static\"], #token, main')")
            assert rendered is None, (attacker.origin, frame.url)
        await page.close()
    await context.close()

"""Pages of other origins, in a real Chromium, attack the running services (real processes, real uvicorn).

A tiny HTTP server on another address (127.0.0.2: another site; 127.0.0.1 on another port: the same
site, another origin) serves attack pages that try to create tasks, approve, answer and read, by fetch
(with and without credentials, "simple" text/plain requests), by auto-submitted HTML forms and by
WebSocket, while a reviewer is logged in to Nexus in the same browser. DNS rebinding is played with
Chromium's host resolver: `rebind.test` resolves to 127.0.0.1, and the attacker's page is served under
that name at the victim's own port. Every verdict is taken on the server side: the task table and the
HITL state do not move.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import pytest
from live_services import NEXUS_TOKEN, SINGULARITY_TOKEN, LiveService, live_service
from playwright.async_api import Browser, BrowserContext, async_playwright, expect
from support import CHROMIUM, CHROMIUM_ARGS
from test_http_protection import publish_as_singularity, task_count, wait_pending

from singularity_stack import contract as c
from singularity_stack.postgres.cluster import free_port
from singularity_stack.provision.provisioner import ProvisionResult

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"MISSING TOOL: {CHROMIUM} not found — apt-get install chromium"
)
REBIND = "rebind.test"


class AttackPages:
    """The attacker's web server: serves whatever page the test put under a path."""

    def __init__(self, address: str) -> None:
        pages: dict[str, str] = {}
        self.pages = pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path, "<!doctype html><title>sink</title>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((address, free_port()), Handler)
        self.origin = f"http://{address}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, script: str) -> str:
        """A page that runs `script` (which fills `window.results` and sets `window.done`); returns its URL."""
        path = f"/{uuid.uuid4().hex}.html"
        self.pages[path] = (
            "<!doctype html><meta charset=utf-8><title>attack</title><body>"
            "<script>window.results = {}; window.done = false;"
            f"(async () => {{ try {{ {script} }} catch (e) {{ results.error = String(e); }} "
            "finally { window.done = true; } })();</script>"
        )
        return self.origin + path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class World:
    stack: ProvisionResult
    singularity: LiveService
    nexus: LiveService
    browser: Browser
    attackers: list[AttackPages]


@pytest.fixture(scope="module")
def services(provision_stack) -> Iterator[tuple[ProvisionResult, LiveService, LiveService]]:
    stack = provision_stack(1)
    with live_service(stack, "singularity_1") as singularity, live_service(stack, "nexus") as nexus:
        yield stack, singularity, nexus


@pytest.fixture(scope="module")
async def world(services) -> AsyncIterator[World]:
    stack, singularity, nexus = services
    attackers = [AttackPages("127.0.0.2"), AttackPages("127.0.0.1")]  # another site; the same site, another port
    args = [
        *CHROMIUM_ARGS,
        f"--host-resolver-rules=MAP {REBIND} 127.0.0.1",
        # The services must not count on Private Network Access: other browsers have none.
        "--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights,"
        "PrivateNetworkAccessRespectPreflightResults,LocalNetworkAccessChecks",
    ]
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
            try:
                yield World(stack, singularity, nexus, browser, attackers)
            finally:
                await browser.close()
    finally:
        for attacker in attackers:
            attacker.close()


async def reviewer_context(world: World) -> BrowserContext:
    """A browser whose reviewer is logged in to Nexus (the session cookie is in the jar)."""
    context = await world.browser.new_context()
    page = await context.new_page()
    await page.goto(world.nexus.url + "/login")
    await page.fill("#token", NEXUS_TOKEN)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(world.nexus.url + "/")
    await expect(page.locator("#connection")).to_have_text("live")
    await page.close()
    return context


async def run_attack(context: BrowserContext, url: str) -> dict:
    page = await context.new_page()
    await page.goto(url)
    await page.wait_for_function("window.done === true", timeout=20_000)
    results: dict = await page.evaluate("window.results")
    await page.close()
    return results


def fetch_attempts(target: str, body: dict, name: str) -> str:
    """JS: POST `body` to `target` every way a page can without being allowed CORS; records what it could see."""
    payload = json.dumps(json.dumps(body))
    token = json.dumps(SINGULARITY_TOKEN)
    return f"""
    const target = {json.dumps(target)}, payload = {payload};
    const attempts = {{
      simple_omit: {{method: "POST", mode: "no-cors", credentials: "omit", body: payload,
                     headers: {{"Content-Type": "text/plain"}}}},
      simple_include: {{method: "POST", mode: "no-cors", credentials: "include", body: payload,
                        headers: {{"Content-Type": "text/plain"}}}},
      json_include: {{method: "POST", credentials: "include", body: payload,
                      headers: {{"Content-Type": "application/json"}}}},
      json_with_a_leaked_token: {{method: "POST", body: payload,
                      headers: {{"Content-Type": "application/json", "Authorization": "Bearer " + {token}}}}},
    }};
    for (const [label, init] of Object.entries(attempts)) {{
      try {{ const r = await fetch(target, init); results[label] = r.type + ":" + r.status; }}
      catch (e) {{ results[label] = "blocked"; }}
    }}
    // HTML forms, auto-submitted into an iframe: text/plain (crafted to be JSON) and urlencoded.
    for (const enctype of ["text/plain", "application/x-www-form-urlencoded"]) {{
      const frame = document.createElement("iframe"); frame.name = "sink-" + enctype.length;
      document.body.append(frame);
      const loaded = new Promise(resolve => frame.onload = resolve);
      const form = document.createElement("form");
      Object.assign(form, {{method: "POST", action: target, enctype, target: frame.name}});
      const input = document.createElement("input");
      input.name = payload.slice(0, -2) + ',"{name}": "'; input.value = '"}}';
      form.append(input); document.body.append(form); form.submit();
      await Promise.race([loaded, new Promise(r => setTimeout(r, 5000))]);
      results["form_" + enctype] = "submitted";
    }}
    """


WEBSOCKET_ATTEMPT = """
    await new Promise(resolve => {
      const ws = new WebSocket(TARGET);
      results.ws_opened = false; results.ws_messages = [];
      ws.onopen = () => { results.ws_opened = true; };
      ws.onmessage = m => results.ws_messages.push(String(m.data).slice(0, 200));
      ws.onclose = e => { results.ws_close = e.code; resolve(); };
      setTimeout(resolve, 5000);
    });
"""


async def test_other_origins_cannot_create_tasks(world: World) -> None:
    context = await reviewer_context(world)
    before = task_count(world.stack)
    for attacker in world.attackers:
        target = f"{world.singularity.url}/tasks"
        results = await run_attack(context, attacker.put(fetch_attempts(target, {"description": "csrf"}, "x")))
        assert results["json_include"] == "blocked" and results["json_with_a_leaked_token"] == "blocked", results
        assert task_count(world.stack) == before, (attacker.origin, results)
    await context.close()


async def test_dns_rebinding_cannot_read_or_create_tasks(world: World) -> None:
    httpx.post(
        f"{world.singularity.url}/tasks",
        json={"description": "private plans"},
        headers={"Authorization": f"Bearer {SINGULARITY_TOKEN}"},
    ).raise_for_status()
    before = task_count(world.stack)
    context = await world.browser.new_context()
    rebound = f"http://{REBIND}:{world.singularity.port}"
    script = """
      const read = await fetch("/tasks"); results.read = read.status + ":" + (await read.text()).slice(0, 300);
      const made = await fetch("/tasks", {method: "POST", body: '{"description": "rebound"}',
                                          headers: {"Content-Type": "application/json"}});
      results.create = made.status;
    """
    attack_page = world.attackers[0].put(script)
    html = world.attackers[0].pages[attack_page.removeprefix(world.attackers[0].origin)]
    # The attacker's DNS answered with its own server for the page, then rebound the name to 127.0.0.1.
    await context.route(f"{rebound}/attack", lambda route: route.fulfill(body=html, content_type="text/html"))
    results = await run_attack(context, f"{rebound}/attack")
    assert results.get("read", "").startswith("400:"), results
    assert "private plans" not in results["read"]
    assert results["create"] == 400
    assert task_count(world.stack) == before
    await context.close()


async def test_other_origins_cannot_approve_answer_or_listen(world: World) -> None:
    approval = c.ApprovalRequest(reply_to="singularity_1", agent_id="a", file_path="x.py", diff="+x", description="d")
    question = c.QuestionRequest(reply_to="singularity_1", agent_id="a", question="which one?")
    await publish_as_singularity(world.stack, approval)
    await publish_as_singularity(world.stack, question)
    await asyncio.to_thread(wait_pending, world.nexus, "approvals", approval.request_id)
    await asyncio.to_thread(wait_pending, world.nexus, "questions", question.request_id)
    context = await reviewer_context(world)
    nexus = world.nexus.url
    for attacker in world.attackers:
        for target, body in (
            (f"{nexus}/api/approvals/{approval.request_id}", {"approved": True, "reason": "csrf"}),
            (f"{nexus}/api/questions/{question.request_id}", {"response": "csrf"}),
        ):
            results = await run_attack(context, attacker.put(fetch_attempts(target, body, "extra")))
            assert results["json_include"] == "blocked", results
        ws = WEBSOCKET_ATTEMPT.replace("TARGET", json.dumps(f"ws://127.0.0.1:{world.nexus.port}/ws"))
        results = await run_attack(context, attacker.put(ws))
        # The handshake itself is refused: the page never gets a connection, let alone the snapshot.
        assert results["ws_opened"] is False and results["ws_messages"] == [], (attacker.origin, results)
    # DNS rebinding to Nexus: no page under a foreign name gets an answer or a WebSocket.
    rebound = f"http://{REBIND}:{world.nexus.port}"
    script = 'const r = await fetch("/api/pending"); results.pending = r.status;' + WEBSOCKET_ATTEMPT.replace(
        "TARGET", json.dumps(f"ws://{REBIND}:{world.nexus.port}/ws")
    )
    url = world.attackers[0].put(script)
    html = world.attackers[0].pages[url.removeprefix(world.attackers[0].origin)]
    await context.route(f"{rebound}/attack", lambda route: route.fulfill(body=html, content_type="text/html"))
    results = await run_attack(context, f"{rebound}/attack")
    assert results["pending"] == 400 and results["ws_opened"] is False, results

    # Server side: both are still pending and nothing but their arrival is in the audit trail.
    pending = httpx.get(f"{nexus}/api/pending", headers={"Authorization": f"Bearer {NEXUS_TOKEN}"}).json()
    assert str(approval.request_id) in [a["request_id"] for a in pending["approvals"]]
    assert str(question.request_id) in [q["request_id"] for q in pending["questions"]]
    with psycopg.connect(world.stack.credentials["nexus"].database_url) as conn:
        actions = conn.execute(
            "SELECT action FROM hitl_audit WHERE request_id = ANY(%s)", ([approval.request_id, question.request_id],)
        ).fetchall()
    assert sorted(a for (a,) in actions) == ["received", "received"]

    # The reviewer's own page, through the same guard, still decides.
    page = await context.new_page()
    await page.goto(nexus + "/")
    shown = page.locator(f'article[data-request-id="{approval.request_id}"]')
    await expect(shown).to_be_visible()
    await shown.get_by_role("button", name="Approve").click()
    await expect(shown).to_have_count(0)
    with contextlib.suppress(Exception):
        await page.close()
    await context.close()
    with psycopg.connect(world.stack.credentials["nexus"].database_url) as conn:
        (state,) = conn.execute(
            "SELECT state FROM hitl_requests WHERE request_id = %s", (approval.request_id,)
        ).fetchone()  # type: ignore[misc]
    assert state == "approved"

"""Singularity's console and Nexus's cards in a real headless Chromium, on the stack `singularity-stack up` runs.

`up` starts PostgreSQL and every service as its own process (Nexus with the offline model, Genesis with its
sandbox) and tells the consoles where each other are; a person logs in, submits a task with the form,
follows it live, answers its question and approves its change in Nexus, going back and forth by the links.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Dialog, Page, async_playwright, expect
from screenshots import save_screenshot
from support import CHROMIUM, CHROMIUM_ARGS

from singularity_stack import contract as c
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.singularity.store import TaskStore

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"BROWSER TESTS SKIPPED: {CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)",
)
WAIT_MS = 90_000  # a task's phases on the offline model and Genesis's sandbox, on a busy 2-core machine


@dataclass
class Up:
    state: dict[str, Any]
    output: Path
    problems: list[str] = field(default_factory=list)  # console errors and uncaught exceptions of every page

    @property
    def console(self) -> str:
        return self.state["consoles"]["singularity_1"].rstrip("/")

    @property
    def nexus(self) -> str:
        return self.state["ui"]["url"].rstrip("/")

    @property
    def api_token(self) -> str:
        return str(self.state["api_tokens"]["singularity"])

    def task(self, task_id: str) -> dict[str, Any]:
        response = httpx.get(
            f"{self.console}/tasks/{task_id}", headers={"Authorization": f"Bearer {self.api_token}"}, timeout=10
        )
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture(scope="module")
def up() -> Iterator[Up]:
    root = Path(tempfile.mkdtemp(prefix="singularity-console-"))
    root.chmod(0o755)  # the PostgreSQL account must reach its data directory
    state_dir = root / "stack"
    state_file, output = root / "state.json", root / "up.log"
    env = {**os.environ, "HUMAN_TIMEOUT_SECONDS": "600", "LLM_TIMEOUT_SECONDS": "60", "JOB_TIMEOUT_SECONDS": "60"}
    command = [sys.executable, "-m", "singularity_stack.cli", "up", "--state-dir", str(state_dir)]
    command += ["--singularity-instances", "1", "--state-file", str(state_file)]
    with output.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while "press Ctrl-C" not in output.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the stack did not come up:\n" + output.read_text())
        time.sleep(0.2)
    try:
        yield Up(json.loads(state_file.read_text()), output)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def context(browser: Browser, up: Up) -> AsyncIterator[BrowserContext]:
    up.problems.clear()
    ctx = await browser.new_context(viewport={"width": 1400, "height": 900})
    ctx.on("page", lambda page: watch(page, up.problems))
    try:
        yield ctx
    finally:
        await ctx.close()
    assert up.problems == []


def watch(page: Page, problems: list[str]) -> None:
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on("console", lambda m: problems.append(f"console: {m.text} ({m.location})") if m.type == "error" else None)


async def log_in(page: Page, base: str, token: str) -> None:
    await page.goto(base + "/")
    await expect(page).to_have_url(base + "/login")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await expect(page).to_have_url(base + "/")


async def rendered_steps(page: Page) -> list[tuple[str, ...]]:
    rows = []
    for row in await page.locator("#timeline li.step").all():
        rows.append(tuple([await row.locator(f".step-{part}").inner_text() for part in STEP_PARTS]))
    return rows


STEP_PARTS = ("seq", "phase", "name", "kind", "model")


def api_steps(task: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(str(s["seq"]), s["phase"], s["name"], s["kind"], s["model"] or "—") for s in task["steps"]]


def test_up_prints_each_console_and_tells_nexus_and_singularity_where_the_other_is(up: Up) -> None:
    printed = up.output.read_text()
    assert re.search(rf"singularity_1\s+{re.escape(up.console)}/", printed)
    services = up.state["services"]
    assert up.console == services["singularity_1"]["url"] and up.nexus == services["nexus"]["url"]


async def test_a_task_from_the_form_to_its_approval_and_back(up: Up, context: BrowserContext) -> None:
    tasks, nexus = await context.new_page(), await context.new_page()
    await log_in(tasks, up.console, up.api_token)
    await log_in(nexus, up.nexus, up.state["ui"]["token"])

    # The form: "TBD" makes the task ask a question before it starts.
    await tasks.fill("#description", "Write a program that prints a friendly greeting; the wording is TBD")
    await tasks.select_option("#language", "python")
    await tasks.set_input_files(
        "#files", files=[{"name": "greet.py", "mimeType": "text/x-python", "buffer": b"print('hi')\n"}]
    )
    await tasks.click("#new-task button[type=submit]")
    await expect(tasks).to_have_url(re.compile(re.escape(up.console) + r"/console/tasks/[0-9a-f-]{36}$"))
    task_id = tasks.url.rsplit("/", 1)[1]
    await tasks.evaluate("window.__sameDocument = true")  # from here on, the page only updates itself

    # Live: the question appears on the timeline, with the link to its card in Nexus.
    question_link = tasks.locator("#review a.review-link")
    await expect(question_link).to_have_text("Open the question in Nexus", timeout=WAIT_MS)
    asked = up.task(task_id)["steps"][0]
    assert (asked["kind"], asked["state"]) == ("question", "waiting")
    await expect(question_link).to_have_attribute("href", f"{up.nexus}/#request-{asked['request_id']}")
    await nexus.goto(await question_link.get_attribute("href") or "")
    question = nexus.locator(f'article[data-request-id="{asked["request_id"]}"]')
    await expect(question).to_have_class(re.compile(r"\btargeted\b"))
    await question.get_by_label("Answer").fill("Say: hello, friend")
    await question.get_by_role("button", name="Send").click()
    await expect(question).to_have_count(0)

    # Then the approval: the card shows the question and the answer the change was built on.
    approval_link = tasks.locator("#review a.review-link")
    await expect(approval_link).to_have_text("Open the approval card in Nexus", timeout=WAIT_MS)
    waiting = up.task(task_id)
    assert await rendered_steps(tasks) == api_steps(waiting)  # while it runs
    approval_step = waiting["steps"][-1]
    assert (approval_step["kind"], approval_step["state"]) == ("approval", "waiting")
    await expect(tasks.locator("#diff-section .line.add").first).to_be_visible()
    await nexus.goto(await approval_link.get_attribute("href") or "")
    card = nexus.locator(f'article[data-request-id="{approval_step["request_id"]}"]')
    await expect(card).to_have_class(re.compile(r"\btargeted\b"))
    await expect(card.locator(".answered-question")).to_have_text(asked["request"]["question"])
    await expect(card.locator(".answered-answer")).to_have_text("Say: hello, friend — shared-token")
    await expect(card.locator(".file-path")).to_have_text("greet.py")
    await save_screenshot(nexus, "nexus-approval", full_page=False)

    # The card leads to its task, and the browser's back button to the card again.
    await card.locator("a.task-link").click()
    await expect(nexus).to_have_url(tasks.url)
    await expect(nexus.locator("#task-description")).to_have_text(waiting["description"])
    await nexus.go_back()
    await expect(nexus.locator("#connection")).to_have_text("live")
    await card.get_by_role("button", name="Approve").click()
    await expect(card).to_have_count(0)

    # The task page, never reloaded, follows it to the end.
    await expect(tasks.locator("body")).to_have_attribute("data-state", "succeeded", timeout=WAIT_MS)
    assert await tasks.evaluate("window.__sameDocument") is True
    done = up.task(task_id)
    assert done["state"] == "succeeded", done["failure_reason"]
    assert await rendered_steps(tasks) == api_steps(done)
    assert [s["kind"] for s in done["steps"]][:2] == ["question", "llm"] and done["steps"][-1]["kind"] == "approval"
    states = [await b.inner_text() for b in await tasks.locator("#timeline .step-state .badge").all()]
    assert states == ["done"] * len(done["steps"])
    await expect(tasks.locator("#review")).to_be_hidden()
    await expect(tasks.locator("#outcome .outcome-line")).to_have_text("Succeeded: greet.py approved by shared-token.")
    diff_lines = [await line.inner_text() for line in await tasks.locator("#diff-section .line").all()]
    assert diff_lines == done["result"]["diff"].rstrip("\n").split("\n")
    await save_screenshot(tasks, "singularity-task")

    # The list, newest first, with the task's state.
    await tasks.goto(up.console + "/")
    row = tasks.locator(f'tr[data-task-id="{task_id}"]')
    await expect(row.locator(".badge")).to_have_text("succeeded")
    await expect(row.locator(".task-phase")).to_have_text("completion")
    listed = httpx.get(f"{up.console}/tasks", headers={"Authorization": f"Bearer {up.api_token}"}, timeout=10).json()
    rendered_ids = [await r.get_attribute("data-task-id") for r in await tasks.locator("#tasks tbody tr").all()]
    assert rendered_ids == [t["id"] for t in listed]
    await save_screenshot(tasks, "singularity-tasks")


async def test_a_refused_task_says_which_field(up: Up, context: BrowserContext) -> None:
    page = await context.new_page()
    await log_in(page, up.console, up.api_token)
    await page.fill("#description", "   ")  # not empty, so the browser sends it; blank, so Singularity refuses it
    await page.click("#new-task button[type=submit]")
    await expect(page.locator("#form-error")).to_contain_text("description")
    await expect(page.locator("#new-task button[type=submit]")).to_be_enabled()
    assert page.url == up.console + "/"
    up.problems[:] = [p for p in up.problems if "422" not in p]  # the refusal itself is logged: expected


# Every IMG, SCRIPT (but the pages' own), B or I element ever added to the page, from its first byte.
WATCH_ELEMENTS = """
window.__madeFromData = [];
new MutationObserver((records) => {
  for (const record of records) {
    for (const node of record.addedNodes) {
      if (node.nodeType !== Node.ELEMENT_NODE) continue;
      for (const made of [node, ...node.querySelectorAll("img, script, b, i")]) {
        const own = made.tagName === "SCRIPT" && (made.getAttribute("src") || "").startsWith("/static/");
        if (["IMG", "SCRIPT", "B", "I"].includes(made.tagName) && !own) window.__madeFromData.push(made.outerHTML);
      }
    }
  }
}).observe(document, { childList: true, subtree: true });
"""


async def test_hostile_text_in_a_task_stays_text(up: Up, context: BrowserContext) -> None:
    """A description, a model's name and answer, and a diff full of HTML, stored as a real task would store them."""
    description = "<img src=x onerror=\"window.__pwned=1;alert('description')\"> <b>bold</b>"
    model = "<script>window.__pwned=1</script>model"
    answer = "<i>answer</i><img src=x onerror=alert('reply')>"
    diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-<b>old</b>\n+<img src=x onerror=alert('diff')>\n"
    pool = connection_pool(up_credentials(up)["singularity_1"]["database_url"], max_size=2)
    await pool.open(wait=True)
    try:
        store, task_id = TaskStore(pool), uuid.uuid4()
        await store.create_task(task_id, "<i>agent</i>", description, "python", {})
        asked = c.LlmRequest(
            reply_to="singularity_1",
            agent_id="<i>agent</i>",
            task_type="planning",
            deadline=datetime.now(UTC) + timedelta(minutes=5),
            messages=[{"role": "user", "content": "<script>alert('prompt')</script>"}],
        )
        await store.add_step(task_id, "specification", "specification", "llm", asked)
        async with pool.connection() as conn, conn.transaction():
            reply = c.LlmResult(**c.reply_fields(asked), result=answer, model=model)
            assert await store.record_reply(conn, reply) == "llm"
        await store.finish(task_id, {"file_path": "x.py", "diff": diff, "review": answer, "approved_by": "<b>r</b>"})
    finally:
        await pool.close()

    page = await context.new_page()
    dialogs: list[str] = []

    async def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    await page.add_init_script(WATCH_ELEMENTS)
    await log_in(page, up.console, up.api_token)
    row = page.locator(f'tr[data-task-id="{task_id}"]')
    await expect(row.locator("a.task-link")).to_have_text(description)
    await expect(row.locator(".task-agent")).to_have_text("<i>agent</i>")
    await row.locator("a.task-link").click()
    await expect(page.locator("body")).to_have_attribute("data-state", "succeeded")
    await expect(page.locator("#task-description")).to_have_text(description)
    await expect(page.locator(".step-model")).to_have_text(model)
    await expect(page.locator("#task-models")).to_have_text(model)
    await expect(page.locator(".step-reply pre")).to_have_text(answer)
    await expect(page.locator(".step-request pre")).to_have_text("planning\n\n<script>alert('prompt')</script>")
    await expect(page.locator("#diff-section .line.add")).to_have_text("+<img src=x onerror=alert('diff')>")
    await expect(page.locator("#outcome .outcome-review")).to_have_text(answer)
    assert await page.evaluate("window.__madeFromData") == []
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    assert dialogs == []


def up_credentials(up: Up) -> dict[str, Any]:
    return dict(json.loads(Path(up.state["credentials_file"]).read_text()))

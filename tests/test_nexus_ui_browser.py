"""The reviewers' page in a real headless Chromium (Debian's `chromium`, driven by Playwright's Python API).

One provisioned stack, one uvicorn server and one browser serve the whole module; every test makes its
own requests and finds its cards by request id. Nothing is downloaded: Playwright drives /usr/bin/chromium.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, Dialog, Page, async_playwright, expect
from screenshots import save_screenshot
from starlette.applications import Starlette
from support import CHROMIUM, CHROMIUM_ARGS, Stack
from test_nexus_hitl import TOKEN, approval, deliver, question, replies, rows, serving

from singularity_stack.contract import AnsweredQuestion
from singularity_stack.nexus.hitl import Hitl
from singularity_stack.nexus.reviewers import ReviewerFile, Reviewers

REVIEWERS = ("alice", "bob", "carol", "dora", "erin")
# singularity_1's console is known to this Nexus; singularity_2's is not (its cards get no link).
CONSOLE_URLS = {"singularity_1": "http://singularity-one.test:8101"}

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"BROWSER TESTS SKIPPED: {CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)",
)


@dataclass
class Ui:
    stack: Stack
    hitl: Hitl
    url: str
    browser: Browser
    tokens: dict[str, str]  # each reviewer's own token
    reviewers: Reviewers
    problems: list[str] = field(default_factory=list)  # console errors and uncaught exceptions

    async def new_page(self) -> Page:
        context = await self.browser.new_context(viewport={"width": 1400, "height": 900})
        page = await context.new_page()
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("console", lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None)
        return page


@pytest.fixture(scope="module")
async def ui(provision_stack, tmp_path_factory) -> AsyncIterator[Ui]:
    stack = Stack(provision_stack(1))
    hitl = Hitl(await stack.db_pool("nexus"), await stack.queue("nexus"))
    file = ReviewerFile(tmp_path_factory.mktemp("nexus") / "reviewers.json")
    tokens = {name: file.add(name) for name in REVIEWERS}
    reviewers = Reviewers(file.path)
    app = Starlette(routes=hitl.routes(TOKEN, reviewers, CONSOLE_URLS))
    try:
        async with serving(app) as host, async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                yield Ui(stack, hitl, f"http://{host}", browser, tokens, reviewers)
            finally:
                await browser.close()
    finally:
        await stack.close()


@pytest.fixture(autouse=True)
def no_browser_errors(ui) -> Iterator[None]:
    """Every test ends without a console error (a CSP violation, a failed request) or an uncaught exception."""
    ui.problems.clear()
    yield
    assert ui.problems == []


async def open_page(ui: Ui, name: str, url: str | None = None) -> Page:
    """A new browser context (its own cookies), logged in as `name` with their token, the live feed connected;
    on `url` (another replica), else on the module's Nexus."""
    url = url or ui.url
    page = await ui.new_page()
    await page.goto(url + "/")
    await expect(page).to_have_url(url + "/login")
    await page.fill("#token", ui.tokens[name])
    await page.click("button[type=submit]")
    await expect(page).to_have_url(url + "/")
    await expect(page.locator("#connection")).to_have_text("live")
    return page


def card(page: Page, request_id: object) -> object:
    return page.locator(f'article[data-request-id="{request_id}"]')


async def test_logging_in_through_the_form(ui):
    page = await ui.new_page()
    await page.goto(ui.url + "/")
    await expect(page).to_have_url(ui.url + "/login")
    assert await page.locator("#name").count() == 0  # nobody types their name: the token says it
    for guess, error in (("a guess", "token: wrong token"), (TOKEN, "the shared UI token is off")):
        await page.fill("#token", guess)
        await page.click("button[type=submit]")
        await expect(page.locator(".error")).to_contain_text(error)
    assert [p for p in ui.problems if "401" not in p] == []  # the 401 itself is logged: expected
    ui.problems.clear()
    await page.fill("#token", ui.tokens["dora"])
    await page.click("button[type=submit]")
    await expect(page).to_have_url(ui.url + "/")
    await expect(page.locator("#reviewer")).to_have_text("dora")
    await expect(page.locator("#connection")).to_have_text("live")
    await page.context.close()


async def test_an_approval_appears_live_with_a_coloured_diff(ui):
    page = await open_page(ui, "alice")
    await page.evaluate("window.__sameDocument = true")  # gone if the page reloaded
    request = approval(agent_id="agent-live", file_path="src/live.py", description="Add the live greeting")
    await deliver(ui.hitl, request)

    shown = card(page, request.request_id)
    await expect(shown).to_be_visible()
    await expect(shown.locator(".file-path")).to_have_text("src/live.py")
    await expect(shown.locator(".description")).to_have_text("Add the live greeting")
    await expect(shown.locator(".meta")).to_contain_text("agent-live")
    await expect(shown.locator(".meta")).to_contain_text("singularity_1")
    age = shown.locator(".age")
    await expect(age).to_contain_text("waiting")
    await expect(age).not_to_have_text(await age.text_content() or "", timeout=3000)  # it counts up
    assert await page.evaluate("window.__sameDocument") is True

    added, deleted = shown.locator(".line.add"), shown.locator(".line.del")
    await expect(added).to_have_text(["+print('new')"])
    await expect(deleted).to_have_text(["-print('old')"])
    style = "e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]"
    assert await added.evaluate(style) == ["rgb(17, 99, 41)", "rgb(218, 251, 225)"]  # green
    assert await deleted.evaluate(style) == ["rgb(164, 14, 38)", "rgb(255, 235, 233)"]  # red
    assert await shown.locator(".diff").evaluate("e => getComputedStyle(e).overflow") == "auto"
    await page.context.close()


async def test_approving_in_one_browser_removes_the_card_from_both(ui):
    alice, bob = await open_page(ui, "alice"), await open_page(ui, "bob")
    request = approval(file_path="src/shared.py")
    await deliver(ui.hitl, request)
    await expect(card(alice, request.request_id)).to_be_visible()
    await expect(card(bob, request.request_id)).to_be_visible()

    await card(alice, request.request_id).get_by_role("button", name="Approve").click()
    await expect(card(alice, request.request_id)).to_have_count(0)
    await expect(card(bob, request.request_id)).to_have_count(0)
    await expect(bob.locator("#toast")).to_contain_text("approved by alice")
    reply = [
        r for r in replies(ui.stack, "approval_responses_singularity_1") if r["request_id"] == str(request.request_id)
    ]
    assert [(r["approved"], r["decided_by"]) for r in reply] == [(True, "alice")]
    await alice.context.close()
    await bob.context.close()


async def test_two_replicas_each_browser_sees_what_the_other_replica_does(ui):
    """Two Nexus replicas (each its own Hitl, pools, feed and server; they share only the nexus database)
    and a browser on each: a request held by one shows on both, a decision on the other clears both."""
    second = Hitl(await ui.stack.db_pool("nexus"), await ui.stack.queue("nexus"))
    stop = asyncio.Event()
    feeds = [ui.hitl.feed(ui.stack.db_url("nexus")), second.feed(ui.stack.db_url("nexus"))]
    listening = [asyncio.create_task(feed.run(stop)) for feed in feeds]
    try:
        for feed in feeds:
            await asyncio.wait_for(feed.connected.wait(), 10)
        async with serving(Starlette(routes=second.routes(TOKEN, ui.reviewers, CONSOLE_URLS))) as host:
            alice, erin = await open_page(ui, "alice"), await open_page(ui, "erin", f"http://{host}")
            request = approval(file_path="src/replicas.py", description="held by the first replica")
            await deliver(ui.hitl, request)
            await expect(card(alice, request.request_id)).to_be_visible()
            await expect(card(erin, request.request_id)).to_contain_text("held by the first replica")

            await card(erin, request.request_id).get_by_role("button", name="Approve").click()
            await expect(card(erin, request.request_id)).to_have_count(0)
            await expect(card(alice, request.request_id)).to_have_count(0)
            await expect(alice.locator("#toast")).to_contain_text("approved by erin")
            reply = [
                r
                for r in replies(ui.stack, "approval_responses_singularity_1")
                if r["request_id"] == str(request.request_id)
            ]
            assert [(r["approved"], r["decided_by"]) for r in reply] == [(True, "erin")]
            await alice.context.close()
            await erin.context.close()
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*listening), 10)


async def test_a_rejection_requires_a_reason(ui):
    page = await open_page(ui, "carol")
    request = approval(file_path="deploy/prod.yaml")
    await deliver(ui.hitl, request)
    shown = card(page, request.request_id)
    reject = shown.get_by_role("button", name="Reject")
    await expect(reject).to_be_disabled()
    await shown.get_by_label("Reason").fill("   ")
    await expect(reject).to_be_disabled()
    await shown.get_by_label("Reason").fill("touches production")
    await expect(reject).to_be_enabled()
    await reject.click()
    await expect(shown).to_have_count(0)
    reply = [
        r for r in replies(ui.stack, "approval_responses_singularity_1") if r["request_id"] == str(request.request_id)
    ]
    assert [(r["approved"], r["reason"], r["decided_by"]) for r in reply] == [(False, "touches production", "carol")]
    await page.context.close()


async def test_answering_a_question(ui):
    page = await open_page(ui, "erin")
    request = question(question="Which database port?", context="Tests use a throwaway cluster.")
    await deliver(ui.hitl, request)
    shown = card(page, request.request_id)
    await expect(shown.locator(".question-text")).to_have_text("Which database port?")
    await expect(shown.locator(".context")).to_have_text("Tests use a throwaway cluster.")
    send = shown.get_by_role("button", name="Send")
    await expect(send).to_be_disabled()
    await shown.get_by_label("Answer").fill("5432")
    await send.click()
    await expect(shown).to_have_count(0)
    reply = [
        r for r in replies(ui.stack, "question_responses_singularity_1") if r["request_id"] == str(request.request_id)
    ]
    assert [(r["response"], r["answered_by"]) for r in reply] == [("5432", "erin")]
    await page.context.close()


async def test_html_in_a_request_is_shown_as_text_and_never_runs(ui):
    page = await open_page(ui, "alice")
    dialogs: list[str] = []

    async def dismiss(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", dismiss)
    await page.evaluate(WATCH_ELEMENTS)
    path = "<img src=x onerror=\"window.__pwned=1;alert('path')\">"
    description = "<script>window.__pwned = 1; alert('description')</script>"
    diff = "@@ -1 +1 @@\n-<b>old</b>\n+<img src=x onerror=alert('diff')>\n"
    request = approval(file_path=path, description=description, diff=diff, agent_id="<i>agent</i>")
    asked = question(question="<script>alert('q')</script>", context="<img src=x onerror=alert('ctx')>")
    await deliver(ui.hitl, request)
    await deliver(ui.hitl, asked)

    shown, q = card(page, request.request_id), card(page, asked.request_id)
    await expect(shown.locator(".file-path")).to_have_text(path)
    await expect(shown.locator(".description")).to_have_text(description)
    await expect(shown.locator(".line.add")).to_have_text(["+<img src=x onerror=alert('diff')>"])
    await expect(shown.locator(".agent")).to_have_text("<i>agent</i>")
    await expect(q.locator(".question-text")).to_have_text("<script>alert('q')</script>")
    await expect(q.locator(".context")).to_have_text("<img src=x onerror=alert('ctx')>")
    assert await page.locator("main img, main script, main b, main i").count() == 0
    # Recorded as it happened: not one element was ever made from the request's text, even for a moment,
    # so there was never an image whose error handler could run (and CSP forbids inline handlers anyway).
    assert await page.evaluate("window.__madeFromData") == []
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    assert dialogs == []
    await page.context.close()


# Every IMG, SCRIPT, B or I element ever added to the page (even if removed again), from now on.
WATCH_ELEMENTS = """() => {
  window.__madeFromData = [];
  new MutationObserver((records) => {
    for (const record of records) {
      for (const node of record.addedNodes) {
        if (node.nodeType !== Node.ELEMENT_NODE) continue;
        for (const made of [node, ...node.querySelectorAll("img, script, b, i")]) {
          if (["IMG", "SCRIPT", "B", "I"].includes(made.tagName)) window.__madeFromData.push(made.outerHTML);
        }
      }
    }
  }).observe(document, { childList: true, subtree: true });
}"""


async def test_the_card_shows_the_answered_question_the_change_was_built_on(ui):
    page = await open_page(ui, "alice")
    await page.evaluate(WATCH_ELEMENTS)
    answered = [
        AnsweredQuestion(
            question="Could you say more? (<b>vague</b>)", answer="<img src=x> print hi", answered_by="bob"
        )
    ]
    request = approval(file_path="src/asked.py", answered=answered)
    plain = approval(file_path="src/not-asked.py")
    await deliver(ui.hitl, request)
    await deliver(ui.hitl, plain)
    shown = card(page, request.request_id)
    await expect(shown.locator(".answered-question")).to_have_text("Could you say more? (<b>vague</b>)")
    await expect(shown.locator(".answered-answer")).to_have_text("<img src=x> print hi — bob")
    await expect(card(page, plain.request_id)).to_be_visible()
    assert await card(page, plain.request_id).locator(".answered").count() == 0
    assert await page.evaluate("window.__madeFromData") == []
    pending = await ui.hitl.snapshot()
    (listed,) = [c for c in pending["approvals"] if c["request_id"] == str(request.request_id)]
    assert listed["answered"] == [
        {"question": answered[0].question, "answer": answered[0].answer, "answered_by": "bob"}
    ]
    await page.context.close()


async def test_a_card_links_to_its_task_when_its_instances_console_is_known(ui):
    page = await open_page(ui, "alice")
    known = approval(file_path="src/linked.py")
    unknown = approval(file_path="src/unlinked.py", reply_to="singularity_2")
    await deliver(ui.hitl, known)
    await deliver(ui.hitl, unknown)
    link = card(page, known.request_id).locator("a.task-link")
    await expect(link).to_have_attribute("href", f"{CONSOLE_URLS['singularity_1']}/console/requests/{known.request_id}")
    await expect(card(page, unknown.request_id)).to_be_visible()
    assert await card(page, unknown.request_id).locator("a").count() == 0  # no link rather than a broken one
    await page.context.close()


async def test_a_link_to_a_card_finds_it_when_it_arrives(ui):
    page = await open_page(ui, "erin")
    request = approval(file_path="src/targeted.py")
    await page.goto(f"{ui.url}/#request-{request.request_id}")
    await expect(page.locator("#connection")).to_have_text("live")
    await deliver(ui.hitl, request)
    await expect(card(page, request.request_id)).to_have_class(re.compile(r"\btargeted\b"))
    await page.context.close()


async def test_a_400_character_diff_line_wraps_and_stays_in_view(ui):
    page = await open_page(ui, "dora")
    long_line = ("+x = '" + "abcdefghij" * 40)[:399] + "'"
    assert len(long_line) == 400
    request = approval(file_path="src/long.py", diff=f"@@ -0,0 +1 @@\n{long_line}\n")
    await deliver(ui.hitl, request)
    shown = card(page, request.request_id)
    line = shown.locator(".line.add")
    await expect(line).to_have_text(long_line)
    fits = "e => [e.scrollWidth, e.clientWidth]"
    for element in (line, shown.locator(".diff"), page.locator("html")):
        scroll_width, client_width = await element.evaluate(fits)
        assert scroll_width <= client_width, (await element.evaluate("e => e.className"), scroll_width, client_width)
    box, viewport = await shown.bounding_box(), page.viewport_size
    assert box is not None and viewport is not None and box["x"] + box["width"] <= viewport["width"]
    assert (await line.bounding_box() or {})["height"] > 3 * 16  # it wrapped onto several lines
    await shown.scroll_into_view_if_needed()
    await save_screenshot(page, "nexus-long-diff", full_page=False)
    await page.context.close()


async def test_a_named_reviewer_approves_and_the_audit_names_them(ui):
    page = await open_page(ui, "bob")
    await expect(page.locator("#reviewer")).to_have_text("bob")
    request = approval(file_path="src/audited.py")
    await deliver(ui.hitl, request)
    await card(page, request.request_id).get_by_role("button", name="Approve").click()
    await expect(card(page, request.request_id)).to_have_count(0)
    audit = await rows(
        ui.hitl, "SELECT action, actor FROM hitl_audit WHERE request_id = %s ORDER BY id", request.request_id
    )
    assert audit == [("received", "system"), ("approved", "bob")]
    await page.context.close()

"""CentralCloud's console in a real headless Chromium: log in, then charts of what the archives hold.

A real CentralCloud (uvicorn, its own database, its read-only analytics role) runs over a freshly
provisioned stack whose queues carry real messages, consumed and archived (test_centralcloud.Traffic).
The charts' data is read back from Chart.js's own objects; the page must raise no console error.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect
from screenshots import save_screenshot
from support import CHROMIUM, CHROMIUM_ARGS
from test_centralcloud import API_TOKEN, Traffic, settings_for
from test_nexus_hitl import serving

from singularity_stack import contract as c
from singularity_stack.centralcloud.service import CentralCloudService
from singularity_stack.sharedqueue.client import QueueMetrics

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"BROWSER TESTS SKIPPED: {CHROMIUM} is missing (apt-get install -y --no-install-recommends chromium)",
)

HOSTILE_MODEL = '<img src=x onerror="window.__pwned = 1">'
HOSTILE_QUEUE = '<img src=y onerror="window.__pwned = 2">'

# Every chart's datasets as {label: [y, ...]} (and its category labels), straight from Chart.js.
CHART_DATA = """() => Object.fromEntries([...document.querySelectorAll('canvas[data-chart]')].map(canvas => {
    const chart = Chart.getChart(canvas);
    if (!chart) return [canvas.dataset.chart, null];
    return [canvas.dataset.chart, {
        labels: chart.data.labels || [],
        datasets: Object.fromEntries(chart.data.datasets.map(d => [d.label, d.data.map(p => p.y ?? p)])),
    }];
}))"""


@dataclass
class Console:
    service: CentralCloudService
    url: str
    browser: Browser
    problems: list[str] = field(default_factory=list)  # console errors and uncaught exceptions

    async def new_page(self) -> Page:
        # A time zone of its own (UTC+05:45) shows that times are drawn in the viewer's local time.
        context = await self.browser.new_context(viewport={"width": 1400, "height": 900}, timezone_id="Asia/Kathmandu")
        page = await context.new_page()
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on(
            "console",
            lambda m: (
                self.problems.append(f"console: {m.text} ({m.location.get('url')})") if m.type == "error" else None
            ),
        )
        return page

    async def log_in(self) -> Page:
        page = await self.new_page()
        await page.goto(self.url + "/")
        await expect(page).to_have_url(self.url + "/login")
        await page.fill("#token", API_TOKEN)
        await page.click("button[type=submit]")
        await expect(page).to_have_url(self.url + "/")
        await expect(page.locator("body[data-renders]")).to_have_count(1)
        return page


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        await browser.close()


@pytest.fixture
async def console_with(sq, browser) -> AsyncIterator[Callable[..., Awaitable[Console]]]:
    """Start a CentralCloud with these settings over the test's stack, served by uvicorn on a free port."""
    started: list[Console] = []
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: object) -> Console:
            service = CentralCloudService(settings_for(sq, **overrides))
            await service.start()
            stack.push_async_callback(service.stop)
            host = await stack.enter_async_context(serving(service.app()))
            started.append(Console(service, f"http://{host}", browser))
            return started[-1]

        yield start
    # No console error and no uncaught exception in any page of the test.
    assert [p for console in started for p in console.problems] == []


@pytest.fixture
async def console(console_with) -> Console:
    # Nothing recomputes or refreshes by itself: what changes, the test asked for.
    return await console_with(console_refresh_seconds=3600)


def totals(chart: dict[str, Any]) -> dict[str, float]:
    return {label: round(sum(values), 6) for label, values in chart["datasets"].items()}


async def put_in_traffic(sq, service: CentralCloudService) -> Traffic:
    traffic = Traffic(sq)
    for task_type, model, cost in (
        ("architect", "claude-opus", 0.25),
        ("architect", "claude-opus", 0.25),
        ("review", HOSTILE_MODEL, 0.02),
    ):
        await traffic.llm(task_type, model, cost)
    await traffic.approval(True, 90)
    await traffic.approval(False, 30)
    for language, status in (("python", c.JobStatus.OK), ("python", c.JobStatus.OK), ("bash", c.JobStatus.TIMEOUT)):
        await traffic.job(language, status)
    for queue in ("llm_requests", "llm_requests", "job_requests"):
        traffic.garbage(queue)
    await traffic.archive_all()
    singularity = await traffic.queue("singularity_1")
    for _ in range(3):  # left waiting: the depth chart shows them
        await singularity.publish(c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language="python"))
    # A queue name is ours to choose, but the page must not trust even that.
    await service.store.record_queue_samples([QueueMetrics(HOSTILE_QUEUE, 2, 2, 5, 2)], 24)
    await service.observe_queues()
    await service.observe_queues()
    await service.learn("test")
    return traffic


async def test_empty_charts_say_what_will_appear(console):
    page = await console.log_in()
    for name, says in (
        ("llm", "once Nexus has answered one"),
        ("approvals", "once a reviewer approves or rejects"),
        ("jobs", "once Genesis has answered a job"),
        ("dead-letters", "No dead letters"),
        ("queues", "once a queue holds a message (sampled every 1 h)"),
    ):
        await expect(page.locator(f'[data-empty-for="{name}"]')).to_be_visible()
        await expect(page.locator(f'[data-empty-for="{name}"]')).to_contain_text(says)
        await expect(page.locator(f'[data-chart-group="{name}"]')).to_be_hidden()
    await expect(page.locator("#tile-approvals")).to_have_text("0 of 0 decided")
    await expect(page.locator("#tile-approvals-note")).to_have_text("no decisions yet")
    # The page's formatting, value by value: what a person reads instead of null or 23.264014500000002.
    formatted = await page.evaluate(
        """() => [ccFormat.money(23.264014500000002), ccFormat.money(0.0042), ccFormat.money(0), ccFormat.money(null),
                  ccFormat.duration(0.42), ccFormat.duration(1.23), ccFormat.duration(90), ccFormat.duration(7200),
                  ccFormat.duration(null), ccFormat.ofTotal(3, 5), ccFormat.percent(0.6), ccFormat.percent(null),
                  ccFormat.when(Date.UTC(2026, 0, 2, 3, 4, 5))]"""
    )
    assert formatted == [
        "$23.26", "$0.0042", "$0.00", "no cost recorded",
        "420 ms", "1.2 s", "1.5 min", "2 h",
        "not yet", "3 of 5", "60%", "no decisions yet",
        "Jan 2, 2026, 08:49:05 AM GMT+5:45",
    ]  # fmt: skip
    await page.context.close()


async def test_the_console_charts_what_the_archives_hold(sq, console):
    traffic = await put_in_traffic(sq, console.service)
    page = await console.log_in()
    charts = await page.evaluate(CHART_DATA)

    assert totals(charts["llm-requests"]) == {"claude-opus": 2, HOSTILE_MODEL: 1}
    assert totals(charts["llm-cost"]) == {"claude-opus": 0.5, HOSTILE_MODEL: 0.02}
    await page.select_option("#llm-group", "task_type")
    by_task = await page.evaluate(CHART_DATA)
    assert totals(by_task["llm-requests"]) == {"architect": 2, "review": 1}
    assert totals(by_task["llm-cost"]) == {"architect": 0.5, "review": 0.02}

    assert totals(charts["approval-decisions"]) == {"approved": 1, "rejected": 1}
    times = charts["response-times"]["datasets"]
    assert [round(s) for s in times["approved"]] == [90] and [round(s) for s in times["rejected"]] == [30]
    assert charts["jobs"]["labels"] == ["bash", "python"]
    assert charts["jobs"]["datasets"] == {"ok": [0, 2], "timeout": [1, 0]}
    assert charts["dead-letters"]["labels"] == ["llm_requests", "job_requests"]
    assert charts["dead-letters"]["datasets"] == {"waiting now": [2, 1], "ever": [2, 1]}
    depth = charts["queue-depth"]["datasets"]
    assert max(depth["job_requests"]) == 3 and max(depth[HOSTILE_QUEUE]) == 2
    assert set(charts["queue-age"]["datasets"]) == set(depth)

    # Totals for people: money, durations, "n of m", local time.
    await expect(page.locator("#tile-llm")).to_have_text("3")
    await expect(page.locator("#tile-llm-note")).to_have_text("$0.52 in all · 0 failed")
    await expect(page.locator("#tile-approvals")).to_have_text("2 of 2 decided")
    await expect(page.locator("#tile-approvals-note")).to_have_text("1 approved (50%) · median response 1 min")
    await expect(page.locator("#tile-jobs-note")).to_have_text("2 of 3 ok")
    await expect(page.locator("#tile-dead")).to_have_text("3")
    await expect(page.locator("#status")).to_contain_text("GMT+5:45")
    text = await page.locator("body").inner_text()
    for raw in ("None", "null", "undefined", "NaN", "0.52000"):
        assert raw not in text

    # The hostile names stayed text: in the table as written, and nothing ran.
    await expect(page.locator("#llm-table tbody td", has_text=HOSTILE_MODEL)).to_have_count(1)
    assert await page.evaluate("document.querySelectorAll('img').length") == 0
    assert await page.evaluate("window.__pwned === undefined") is True

    await page.select_option("#llm-group", "model")
    await save_screenshot(page, "centralcloud")

    # Recompute now: a new decision is on the page at once (nothing else recomputes in this test).
    await traffic.approval(True, 10)
    await traffic.archive_all()
    await page.click("#recompute")
    await expect(page.locator("#tile-approvals")).to_have_text("3 of 3 decided")
    after = await page.evaluate(CHART_DATA)
    assert totals(after["approval-decisions"]) == {"approved": 2, "rejected": 1}
    await page.context.close()


async def test_the_page_shows_a_decision_by_itself_soon_after_it_is_archived(sq, console_with):
    """The page said 'decided 0' right after a decision; now the archive check recomputes and the page
    refreshes on its own, both well inside the 60 s analytics interval (an hour here)."""
    console = await console_with(archive_check_interval_seconds=0.2, console_refresh_seconds=1)
    page = await console.log_in()
    await expect(page.locator("#tile-approvals")).to_have_text("0 of 0 decided")
    traffic = Traffic(sq)
    await traffic.approval(True, 45)
    await traffic.archive_all()
    await expect(page.locator("#tile-approvals")).to_have_text("1 of 1 decided", timeout=20_000)
    note = re.compile(r"^1 approved \(100%\) · median response 45(\.\d)? s$")  # 45 s and the reply's own delay
    await expect(page.locator("#tile-approvals-note")).to_have_text(note)
    await expect(page.locator("#status")).to_contain_text("this page refreshes every 1 s")
    await page.context.close()

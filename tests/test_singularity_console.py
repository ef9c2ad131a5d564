"""Singularity's console over HTTP: pages behind the instance's login, the JSON the pages read, the links.

A real SingularityService on a provisioned stack, in-process; nobody answers its requests here, so each
task waits on its first step (tests/test_singularity_console_browser.py runs tasks to the end in Chromium).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from pydantic import ValidationError

from singularity_stack.nexus.service import NexusSettings
from singularity_stack.singularity.service import SingularityService, SingularitySettings

TOKEN = "singularity-console-test-token"
ORIGIN = "http://localhost"
NEXUS = "http://127.0.0.1:8765"
DB = "postgresql://nobody@127.0.0.1:1/singularity_1"  # settings only: never connected to
Start = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def start(sq) -> AsyncIterator[Start]:
    services: list[SingularityService] = []
    clients: list[httpx.AsyncClient] = []

    async def start_(**overrides: object) -> httpx.AsyncClient:
        settings = SingularitySettings(
            database_url=sq.db_url("singularity_1"),
            shared_queue_url=sq.url("singularity_1"),
            api_token=TOKEN,
            **overrides,
        )
        service = SingularityService(settings)
        await service.start()
        services.append(service)
        clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app()), base_url=ORIGIN))
        return clients[-1]

    yield start_
    for client in clients:
        await client.aclose()
    for service in services:
        await service.stop()


async def log_in(client: httpx.AsyncClient) -> None:
    response = await client.post("/login", data={"token": TOKEN}, headers={"origin": ORIGIN})
    assert (response.status_code, response.headers["location"]) == (303, "/")


async def submit(client: httpx.AsyncClient, description: str) -> str:
    response = await client.post("/tasks", json={"description": description}, headers={"origin": ORIGIN})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def first_step(client: httpx.AsyncClient, task_id: str) -> dict:
    async with asyncio.timeout(20):
        while True:
            task = (await client.get(f"/tasks/{task_id}")).json()
            if task["steps"]:
                return task
            await asyncio.sleep(0.05)


PAGE = {"accept": "text/html", "sec-fetch-mode": "navigate"}


async def test_the_pages_need_the_instances_token_then_its_cookie(start):
    client = await start()
    for path in ("/", "/console/tasks/00000000-0000-0000-0000-000000000000"):
        refused = await client.get(path, headers=PAGE)
        assert (refused.status_code, refused.headers["location"]) == (303, "/login"), path
    assert (await client.get("/static/tasks.js")).status_code == 401  # the console's own code needs the session
    form = await client.get("/login")
    assert "Singularity · singularity_1" in form.text
    await log_in(client)
    assert list(client.cookies.keys()) == ["singularity_1_default_console"]  # per instance (and port)
    page = await client.get("/", headers=PAGE)
    assert page.status_code == 200 and "<h1>Singularity" in page.text and "singularity_1" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<option value="python">python</option>' in page.text
    script = await client.get("/static/tasks.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text and "textContent" in (await client.get("/static/console.js")).text
    # Only the scripts and style: not the pages' raw HTML, and nothing outside static/.
    for path in ("/static/tasks.html", "/static/..%2Fservice.py", "/static/nope.js"):
        assert (await client.get(path)).status_code == 404, path


async def test_the_form_submits_with_the_cookie_and_our_origin_only(start):
    client = await start()
    await log_in(client)
    no_origin = await client.post("/tasks", json={"description": "Write a program that prints hello"})
    assert no_origin.status_code == 403 and "origin" in no_origin.json()["error"]
    bad = await client.post("/tasks", json={"description": "", "language": "cobol"}, headers={"origin": ORIGIN})
    assert bad.status_code == 422 and "description" in bad.json()["error"] and "language" in bad.json()["error"]
    task_id = await submit(client, "Write a program that prints hello")
    assert [t["id"] for t in (await client.get("/tasks")).json()] == [task_id]
    page = await client.get(f"/console/tasks/{task_id}", headers=PAGE)
    assert page.status_code == 200 and 'src="/static/task.js"' in page.text
    missing = await client.get("/console/tasks/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404 and "task_id" in missing.json()["error"]
    assert (await client.get("/console/tasks/not-a-uuid")).status_code == 404


async def test_a_step_shows_its_request_and_how_long_it_waited(start):
    client = await start()
    await log_in(client)
    task = await first_step(client, await submit(client, "Write a program that prints hello"))
    (step,) = task["steps"]
    assert (step["kind"], step["state"], step["review_url"]) == ("llm", "waiting", None)
    assert step["request"]["task_type"] == "planning" and step["request"]["request_id"] == step["request_id"]
    waited = step["waited_seconds"]
    async with asyncio.timeout(10):  # a waiting step's wait grows, on the database's clock
        while (await client.get(f"/tasks/{task['id']}")).json()["steps"][0]["waited_seconds"] <= waited:
            await asyncio.sleep(0.05)


async def test_a_waiting_question_links_to_its_nexus_card_only_when_nexus_is_known(start):
    for nexus, expected in (("", None), (NEXUS + "/", NEXUS)):
        client = await start(nexus_console_url=nexus)
        await log_in(client)
        task = await first_step(client, await submit(client, "Improve it?"))  # vague: it asks first
        (step,) = task["steps"]
        assert (step["kind"], step["state"]) == ("question", "waiting")
        assert step["review_url"] == (f"{expected}/#request-{step['request_id']}" if expected else None)


async def test_a_request_id_leads_to_its_tasks_page(start):
    client = await start()
    await log_in(client)
    task = await first_step(client, await submit(client, "Write a program that prints hello"))
    request_id = task["steps"][0]["request_id"]
    found = await client.get(f"/console/requests/{request_id}", headers=PAGE)
    assert (found.status_code, found.headers["location"]) == (303, f"/console/tasks/{task['id']}")
    unknown = await client.get("/console/requests/00000000-0000-0000-0000-000000000000")
    assert unknown.status_code == 404 and "request_id" in unknown.json()["error"]


@pytest.mark.parametrize("url", ["javascript:alert(1)", "ftp://nexus", "http://nexus/?x=1", "http://u:p@nexus"])
def test_a_nexus_url_that_is_not_an_http_base_url_is_refused_by_name(url):
    with pytest.raises(ValidationError, match="NEXUS_CONSOLE_URL"):
        SingularitySettings(database_url=DB, shared_queue_url=DB, api_token=TOKEN, nexus_console_url=url)


@pytest.mark.parametrize(
    "urls",
    [{"singularity_1": "javascript:alert(1)"}, {"nexus": "http://127.0.0.1:1"}, {"singularity_1": "http://h/#x"}],
)
def test_nexus_refuses_console_urls_that_are_not_instances_and_http_base_urls(urls):
    with pytest.raises(ValidationError, match="NEXUS_SINGULARITY_CONSOLE_URLS"):
        NexusSettings(database_url=DB, shared_queue_url=DB, ui_token=TOKEN, singularity_console_urls=urls)


def test_nexus_reads_the_console_urls_as_json_from_its_environment(monkeypatch):
    monkeypatch.setenv("NEXUS_SINGULARITY_CONSOLE_URLS", '{"singularity_2": "http://127.0.0.1:8004/"}')
    settings = NexusSettings(database_url=DB, shared_queue_url=DB, ui_token=TOKEN)
    assert settings.singularity_console_urls == {"singularity_2": "http://127.0.0.1:8004"}

"""README claims about the Nexus service as a whole: its `llm_calls` history and its periodic HITL expiry.

NexusService runs in-process with its own consumers and jobs (real PostgreSQL + pgmq, Nexus's own role);
requests arrive on the queue as Singularity sends them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import psycopg
import pytest

from singularity_stack import contract as c
from singularity_stack.nexus import offline_model as om
from singularity_stack.nexus import service as service_module
from singularity_stack.nexus.service import NexusService, NexusSettings

PROVIDER_KEYS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY")


@pytest.fixture
async def nexus(sq, monkeypatch) -> AsyncIterator[Callable[[], Awaitable[NexusService]]]:
    """Start NexusService with the settings the environment gives it (set variables first)."""
    for key in PROVIDER_KEYS:
        monkeypatch.delenv(key, raising=False)  # the offline model only: no network
    started: list[NexusService] = []

    async def start() -> NexusService:
        settings = NexusSettings(
            database_url=sq.db_url("nexus"), shared_queue_url=sq.url("nexus"), ui_token="nexus-ui-token-for-tests"
        )
        service = NexusService(settings)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


def nexus_rows(sq, query: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(sq.db_url("nexus")) as conn:
        return conn.execute(query, params).fetchall()


async def until(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what} never held"
        await asyncio.sleep(0.05)


async def test_every_llm_call_is_recorded_in_the_history(sq, nexus):
    await nexus()
    answered = c.LlmRequest(
        reply_to="singularity_1",
        agent_id="agent-7",
        task_type="code_generation",
        messages=[{"role": "user", "content": "fizzbuzz"}],
    )
    failed = c.LlmRequest(
        reply_to="singularity_1",
        agent_id="agent-8",
        task_type="chat",
        complexity="simple",
        messages=[{"role": "user", "content": f"hello {om.FAIL_MARKER}"}],
    )
    await (await sq.queue("singularity_1")).publish_batch([answered, failed])
    await until(lambda: len(nexus_rows(sq, "SELECT 1 FROM llm_calls")) == 2, what="two llm_calls rows")
    history = {
        row[0]: row[1:]
        for row in nexus_rows(
            sq,
            "SELECT request_id, instance, agent_id, task_type, complexity, complexity_source, model, provider_model, "
            "cost_usd, prompt_tokens > 0, completion_tokens > 0, latency_ms >= 0, error FROM llm_calls",
        )
    }
    assert history[answered.request_id] == (
        "singularity_1",
        "agent-7",
        "code_generation",
        "complex",
        "classifier",
        "offline",
        om.OFFLINE_MODEL,
        Decimal(0),
        True,
        True,
        True,
        None,
    )
    *fields, error = history[failed.request_id]
    assert fields == ["singularity_1", "agent-8", "chat", "simple", None, None, None, Decimal(0), False, False, None]
    assert "offline stand-in failed" in error
    # The history says what the replies said.
    replies = {r["request_id"]: r for (r,) in sq.owner_query("SELECT message FROM pgmq.q_llm_results_singularity_1")}
    assert replies[str(answered.request_id)]["model"] == "offline"
    assert "offline stand-in failed" in replies[str(failed.request_id)]["error"]


async def test_the_periodic_job_expires_a_request_at_its_deadline(sq, nexus, monkeypatch):
    """Nobody calls expire_overdue() here: the service's own job (HITL_EXPIRY_INTERVAL_SECONDS) does."""
    monkeypatch.setenv("HITL_EXPIRY_INTERVAL_SECONDS", "0.2")
    service = await nexus()
    request = c.ApprovalRequest(
        reply_to="singularity_1",
        agent_id="agent-7",
        file_path="app.py",
        diff="+print(1)\n",
        description="print one",
        deadline=datetime.now(UTC) + timedelta(seconds=2),
    )
    later = c.QuestionRequest(
        reply_to="singularity_1",
        agent_id="agent-7",
        question="Which port?",
        context="",
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    with service.hitl.broadcaster.subscribe() as inbox:
        await (await sq.queue("singularity_1")).publish_batch([request, later])
        events: list[dict] = []
        while not any(e.get("type") == "removed" for e in events):
            events.append(await asyncio.wait_for(inbox.get(), 30))
    added = [e["card"]["request_id"] for e in events if e["type"] == "added"]
    assert sorted(added) == sorted([str(request.request_id), str(later.request_id)])
    assert events[-1] == {"type": "removed", "request_id": str(request.request_id), "state": "expired", "by": "system"}
    [(state, decided_by, decided_at, deadline)] = nexus_rows(
        sq,
        "SELECT state, decided_by, decided_at, deadline FROM hitl_requests WHERE request_id = %s",
        (request.request_id,),
    )
    assert (state, decided_by) == ("expired", "system")
    assert decided_at >= deadline  # at its deadline, not before
    audit = nexus_rows(
        sq, "SELECT action, actor FROM hitl_audit WHERE request_id = %s ORDER BY id", (request.request_id,)
    )
    assert audit == [("received", "system"), ("expired", "system")]
    assert nexus_rows(sq, "SELECT state FROM hitl_requests WHERE request_id = %s", (later.request_id,)) == [
        ("pending",)
    ]
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_approval_responses_singularity_1") == [(0,)]


def test_importing_the_nexus_service_does_not_import_litellm():
    """litellm takes seconds to import: Nexus's start-up path (its service module) must not pay for it."""
    probe = "import sys, singularity_stack.nexus.service; print('litellm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.strip() == "False"


async def test_nexus_is_ready_and_holds_approvals_while_its_router_loads(sq, nexus, monkeypatch):
    """The router (litellm) loads in the background: /readyz says ready with llm_router "loading", approvals
    are held at once, and an LLM request sent meanwhile is answered once the router is there."""
    release, real_load = threading.Event(), service_module.load_router

    def slow_load(config):
        assert release.wait(30), "the test never released the router"
        return real_load(config)

    monkeypatch.setattr(service_module, "load_router", slow_load)
    service = await nexus()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app()), base_url="http://127.0.0.1")
    # Ready once its pools and listeners are connected, while the router is still held back by the test.
    deadline = asyncio.get_running_loop().time() + 30
    while (ready := await client.get("/readyz")).status_code != 200:
        assert asyncio.get_running_loop().time() < deadline, ready.text
        await asyncio.sleep(0.05)
    assert ready.json()["details"]["llm_router"] == "loading"
    llm = c.LlmRequest(
        reply_to="singularity_1", agent_id="a", task_type="chat", messages=[{"role": "user", "content": "hi"}]
    )
    approval = c.ApprovalRequest(
        reply_to="singularity_1",
        agent_id="a",
        file_path="app.py",
        diff="+print(1)\n",
        description="print one",
        deadline=datetime.now(UTC) + timedelta(hours=1),
    )
    with service.hitl.broadcaster.subscribe() as inbox:
        await (await sq.queue("singularity_1")).publish_batch([llm, approval])
        added = await asyncio.wait_for(inbox.get(), 30)
    assert added["type"] == "added" and added["card"]["request_id"] == str(approval.request_id)
    assert nexus_rows(sq, "SELECT 1 FROM llm_calls") == []  # still waiting for the router
    release.set()
    await until(lambda: len(nexus_rows(sq, "SELECT 1 FROM llm_calls")) == 1, what="the LLM request answered")
    [(reply,)] = sq.owner_query("SELECT message FROM pgmq.q_llm_results_singularity_1")
    assert reply["request_id"] == str(llm.request_id) and reply["model"] == "offline"
    assert (await client.get("/readyz")).json()["details"]["llm_router"] == "ready"


async def test_a_router_that_cannot_load_makes_nexus_unready_with_the_reason(sq, nexus, monkeypatch):
    def broken(config):
        raise RuntimeError("no litellm here")

    monkeypatch.setattr(service_module, "load_router", broken)
    service = await nexus()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app()), base_url="http://127.0.0.1")
    await until(lambda: service.router_state() != "loading", what="the load to end")
    answer = await client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["problems"] == {"llm_router": "failed: RuntimeError: no litellm here"}

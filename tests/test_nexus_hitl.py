"""Nexus's human-in-the-loop part against a real provisioned stack: storage, decisions, replies on the
shared queue, the audit trail, the HTTP API and its auth, and the WebSocket push.

HTTP goes through httpx's ASGI transport; WebSocket tests serve the app with uvicorn as a task on the
test's own event loop (Starlette's TestClient would run the app on another loop than the psycopg pool).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from singularity_stack.contract import ApprovalRequest, QuestionRequest
from singularity_stack.nexus.hitl import Conflict, Hitl
from singularity_stack.nexus.hitl_web import SESSION_COOKIE, SESSION_MAX_AGE, Auth
from singularity_stack.nexus.reviewers import ReviewerFile, Reviewers

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
DIFF = "--- a/src/app.py\n+++ b/src/app.py\n@@ -1,2 +1,2 @@\n import sys\n-print('old')\n+print('new')\n"


# -- helpers shared with test_nexus_ui_browser.py ------------------------------------------------------


def approval(**overrides: Any) -> ApprovalRequest:
    fields: dict[str, Any] = {
        "reply_to": "singularity_1",
        "agent_id": "agent-7",
        "file_path": "src/app.py",
        "diff": DIFF,
        "description": "Print the new greeting",
    }
    return ApprovalRequest(**(fields | overrides))


def question(**overrides: Any) -> QuestionRequest:
    fields: dict[str, Any] = {
        "reply_to": "singularity_1",
        "agent_id": "agent-9",
        "question": "Which port should the service listen on?",
        "context": "The spec says 'a free port'.",
    }
    return QuestionRequest(**(fields | overrides))


async def deliver(hitl: Hitl, request: ApprovalRequest | QuestionRequest) -> None:
    """What the shared-queue consumer does: receive inside a transaction on the nexus database, then run
    what was registered to happen after the commit."""
    callbacks: list[Callable[[], object]] = []
    async with hitl.store.pool.connection() as conn, conn.transaction():
        await hitl.receive(conn, request, request.reply_to, callbacks.append)  # the vouched sender
    for callback in callbacks:
        callback()


@contextlib.asynccontextmanager
async def serving(app: Starlette) -> AsyncIterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 and a free port, as a task of the running loop; yields host:port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host = f"127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", ws="websockets-sansio", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn stopped while starting"
                await asyncio.sleep(0.01)
        yield host
    finally:
        server.should_exit = True
        await task
        sock.close()


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture
async def hitl(sq) -> AsyncIterator[Hitl]:
    yield Hitl(await sq.db_pool("nexus"), await sq.queue("nexus"))


@pytest.fixture
async def client(hitl) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(routes=hitl.routes(TOKEN))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nexus") as http:
        yield http


@dataclass
class Team:
    """Named reviewers in a reviewers file, and the token each was given (shown once by `add`)."""

    path: Path
    tokens: dict[str, str]

    def bearer(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}


@pytest.fixture
def team(tmp_path: Path) -> Team:
    file = ReviewerFile(tmp_path / "reviewers.json")
    return Team(file.path, {name: file.add(name) for name in ("alice", "bob")})


@contextlib.asynccontextmanager
async def asgi_client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nexus") as http:
        yield http


@pytest.fixture
def named_app(hitl: Hitl, team: Team) -> Starlette:
    """Nexus's UI with the team's reviewers file (so the shared token is off)."""
    return Starlette(routes=hitl.routes(TOKEN, Reviewers(team.path)))


@pytest.fixture
async def named(named_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(named_app) as http:
        yield http


async def rows(hitl: Hitl, query: str, *params: Any) -> list[tuple]:
    async with hitl.store.pool.connection() as conn:
        return await (await conn.execute(query, params)).fetchall()


async def audit(hitl: Hitl, request_id: uuid.UUID) -> list[tuple]:
    return await rows(
        hitl, "SELECT action, actor, detail FROM hitl_audit WHERE request_id = %s ORDER BY id", request_id
    )


async def state(hitl: Hitl, request_id: uuid.UUID) -> tuple:
    (row,) = await rows(hitl, "SELECT state, decided_by FROM hitl_requests WHERE request_id = %s", request_id)
    return row


def replies(sq, queue: str) -> list[dict]:
    return [row[0] for row in sq.owner_query(f"SELECT message FROM pgmq.q_{queue} ORDER BY msg_id")]


async def login(client: httpx.AsyncClient, token: str = TOKEN) -> httpx.Response:
    return await client.post("/login", data={"token": token})


# -- auth ------------------------------------------------------------------------------------------------


async def test_api_calls_need_the_token(client):
    for method, path in [("GET", "/api/pending"), ("POST", f"/api/approvals/{uuid.uuid4()}")]:
        response = await client.request(method, path, json={"approved": True})
        assert response.status_code == 401, path
        assert "not authenticated" in response.json()["error"]
        wrong = await client.request(method, path, headers={"Authorization": "Bearer nope"}, json={"approved": True})
        assert wrong.status_code == 401
    response = await client.get("/api/pending", headers=BEARER)
    assert response.status_code == 200
    assert response.json() == {"approvals": [], "questions": []}


async def test_the_page_redirects_to_the_login_form_until_logged_in(client):
    response = await client.get("/")
    assert response.status_code == 303 and response.headers["location"] == "/login"
    form = await client.get("/login")
    assert form.status_code == 200
    assert 'name="token"' in form.text and 'action="/login"' in form.text
    page = await client.get("/", headers=BEARER)
    assert page.status_code == 200 and "/static/hitl.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    script = await client.get("/static/hitl.js")  # public: code, no data
    assert script.status_code == 200 and "textContent" in script.text


async def test_a_wrong_token_gets_a_401_page_with_the_reason(client):
    response = await client.post("/login", data={"token": "guess"})
    assert response.status_code == 401
    assert "token: wrong token" in response.text
    assert SESSION_COOKIE not in response.headers.get("set-cookie", "")


async def test_login_sets_a_strict_httponly_session_cookie(client):
    response = await login(client)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert TOKEN not in cookie  # an HMAC, not the token itself
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/api/pending")).status_code == 200
    assert (await client.get("/login")).headers["location"] == "/"  # already logged in

    # A cookie changed by hand (another name, or issued later, same signature) is worthless.
    name, issued, signature = client.cookies[SESSION_COOKIE].split(".")
    assert base64.urlsafe_b64decode(name + "==") == b"shared-token"
    client.cookies.clear()
    for forged in (f"Ym9i.{issued}.{signature}", f"{name}.{int(issued) + 3600}.{signature}", "garbage"):
        client.cookies.set(SESSION_COOKIE, forged)
        assert (await client.get("/api/pending")).status_code == 401, forged
    stale = Auth(TOKEN, Reviewers(None)).session_value("shared-token", issued=int(time.time()) - SESSION_MAX_AGE - 60)
    client.cookies.set(SESSION_COOKIE, stale)
    assert (await client.get("/api/pending")).status_code == 401  # signed by us, but too old

    client.cookies.clear()
    await login(client)
    logout = await client.post("/logout")
    assert logout.status_code == 303 and logout.headers["location"] == "/login"
    assert (await client.get("/api/pending")).status_code == 401


async def test_a_name_typed_at_login_is_refused_not_recorded(client):
    response = await client.post("/login", data={"token": TOKEN, "name": "alice"})
    assert response.status_code == 400
    assert "name: not a field of this form" in response.text
    assert SESSION_COOKIE not in response.headers.get("set-cookie", "")


async def test_cookie_requests_from_another_site_are_refused(client, hitl):
    request = approval()
    await deliver(hitl, request)
    await login(client)
    response = await client.post(
        f"/api/approvals/{request.request_id}", json={"approved": True}, headers={"Origin": "https://evil.example"}
    )
    assert response.status_code == 403
    assert (await state(hitl, request.request_id))[0] == "pending"
    login_elsewhere = await client.post("/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"})
    assert login_elsewhere.status_code == 403


# -- named reviewers -------------------------------------------------------------------------------------


async def test_two_reviewers_decide_with_their_own_tokens_and_the_audit_names_them(named_app, team, hitl, sq):
    change, risky, asked = approval(), approval(file_path="deploy/prod.yaml"), question()
    for request in (change, risky, asked):
        await deliver(hitl, request)
    async with asgi_client(named_app) as alice, asgi_client(named_app) as bob:
        logged_in = await login(alice, team.tokens["alice"])
        assert logged_in.status_code == 303, logged_in.text
        assert (await alice.post(f"/api/approvals/{change.request_id}", json={"approved": True})).status_code == 200
        # bob as a script: his token in the header, no session
        rejected = await bob.post(
            f"/api/approvals/{risky.request_id}", json={"approved": False, "reason": "prod"}, headers=team.bearer("bob")
        )
        assert rejected.status_code == 200, rejected.text
        answered = await bob.post(
            f"/api/questions/{asked.request_id}", json={"response": "8080"}, headers=team.bearer("bob")
        )
        assert answered.status_code == 200, answered.text
    assert (await audit(hitl, change.request_id))[-1][:2] == ("approved", "alice")
    assert (await audit(hitl, risky.request_id))[-1][:2] == ("rejected", "bob")
    assert (await audit(hitl, asked.request_id))[-1][:2] == ("answered", "bob")
    assert [r["decided_by"] for r in replies(sq, "approval_responses_singularity_1")] == ["alice", "bob"]
    assert [r["answered_by"] for r in replies(sq, "question_responses_singularity_1")] == ["bob"]


async def test_a_forged_name_never_reaches_the_audit(named, named_app, team, hitl):
    request, asked = approval(), question()
    await deliver(hitl, request)
    await deliver(hitl, asked)
    await login(named, team.tokens["bob"])
    url = f"/api/approvals/{request.request_id}"
    for field in ("decided_by", "reviewer", "actor"):
        response = await named.post(url, json={"approved": True, field: "mallory"})
        assert response.status_code == 422 and response.json()["error"].startswith(f"{field}:"), response.text
    forged = await named.post(f"/api/questions/{asked.request_id}", json={"response": "y", "answered_by": "mallory"})
    assert forged.status_code == 422 and forged.json()["error"].startswith("answered_by:")
    assert await state(hitl, request.request_id) == ("pending", None)
    # A cookie naming someone else, with bob's signature, is nobody's.
    _, issued, signature = named.cookies[SESSION_COOKIE].split(".")
    alice_name = base64.urlsafe_b64encode(b"alice").decode().rstrip("=")
    async with asgi_client(named_app) as stranger:
        stranger.cookies.set(SESSION_COOKIE, f"{alice_name}.{issued}.{signature}")
        assert (await stranger.post(url, json={"approved": True})).status_code == 401
    response = await named.post(url, json={"approved": True}, headers={"X-Reviewer": "mallory"})
    assert response.status_code == 200
    assert [a[1] for a in await audit(hitl, request.request_id)] == ["system", "bob"]
    assert await state(hitl, request.request_id) == ("approved", "bob")


async def test_a_removed_reviewer_is_refused_at_once(named_app, team, hitl):
    request = approval()
    await deliver(hitl, request)
    async with asgi_client(named_app) as bob, asgi_client(named_app) as alice:
        await login(bob, team.tokens["bob"])
        await login(alice, team.tokens["alice"])
        assert (await bob.get("/api/pending")).status_code == 200
        ReviewerFile(team.path).remove("bob")
        response = await bob.post(f"/api/approvals/{request.request_id}", json={"approved": True})
        assert response.status_code == 401 and response.json()["error"].startswith("authorization:")
        assert (await bob.get("/")).status_code == 303  # back to the login form
        assert (await bob.get("/api/pending", headers=team.bearer("bob"))).status_code == 401
        relogin = await login(bob, team.tokens["bob"])
        assert relogin.status_code == 401 and "token: wrong token" in relogin.text
        assert (await alice.get("/api/pending")).status_code == 200  # the others are unaffected
        # Added again, bob gets a new token: the old one and the old session stay dead.
        team.tokens["bob2"] = ReviewerFile(team.path).add("bob")
        assert (await bob.get("/api/pending")).status_code == 401
        assert (await bob.get("/api/pending", headers=team.bearer("bob"))).status_code == 401
        assert (await bob.get("/api/pending", headers=team.bearer("bob2"))).status_code == 200
    assert await state(hitl, request.request_id) == ("pending", None)


async def test_the_shared_token_is_off_once_a_reviewer_is_named(hitl, tmp_path):
    path = tmp_path / "reviewers.json"
    ReviewerFile(path).ensure()  # what `up` starts with: nobody named
    async with asgi_client(Starlette(routes=hitl.routes(TOKEN, Reviewers(path)))) as http:
        await login(http)
        assert (await http.get("/api/pending")).status_code == 200
        ReviewerFile(path).add("alice")
        assert (await http.get("/api/pending")).status_code == 401  # the shared session ended
        assert (await http.get("/api/pending", headers=BEARER)).status_code == 401
        refused = await login(http)
        assert refused.status_code == 401 and "token: the shared UI token is off" in refused.text


async def test_a_removed_reviewers_websocket_is_closed_before_the_next_push(hitl, named_app, team):
    async with serving(named_app) as host, connect(f"ws://{host}/ws", additional_headers=team.bearer("bob")) as ws:
        assert (await next_event(ws))["reviewer"] == "bob"
        ReviewerFile(team.path).remove("bob")
        await deliver(hitl, approval(description="for reviewers only"))
        with pytest.raises(ConnectionClosed) as closed:
            await next_event(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


# -- listing ---------------------------------------------------------------------------------------------


async def test_pending_lists_cards_oldest_first(client, hitl):
    first, second, asked = approval(), approval(file_path="README.md", diff=""), question()
    deadline = datetime.now(UTC) + timedelta(hours=1)
    await deliver(hitl, first)
    await deliver(hitl, question(request_id=asked.request_id, deadline=deadline))
    await deliver(hitl, second)
    body = (await client.get("/api/pending", headers=BEARER)).json()
    assert [c["request_id"] for c in body["approvals"]] == [str(first.request_id), str(second.request_id)]
    card = body["approvals"][0]
    assert card | {"received_at": None, "age_seconds": None} == {
        "request_id": str(first.request_id),
        "kind": "approval",
        "agent_id": "agent-7",
        "instance": "singularity_1",
        "received_at": None,
        "deadline": None,
        "age_seconds": None,
        "file_path": "src/app.py",
        "description": "Print the new greeting",
        "diff": DIFF,
    }
    assert datetime.fromisoformat(card["received_at"]) <= datetime.now(UTC)
    assert card["age_seconds"] >= 0
    (q,) = body["questions"]
    assert q["kind"] == "question" and q["question"] == asked.question and q["context"] == asked.context
    assert datetime.fromisoformat(q["deadline"]) == deadline
    assert "file_path" not in q and "question" not in card


async def test_a_redelivered_request_is_stored_once(hitl):
    request = approval()
    await deliver(hitl, request)
    await deliver(hitl, request)
    assert len(await hitl.pending()) == 1
    assert [a[0] for a in await audit(hitl, request.request_id)] == ["received"]


# -- decisions -------------------------------------------------------------------------------------------


async def test_approving_publishes_the_reply_records_the_audit_and_is_final(named, team, hitl, sq):
    client = named
    request = approval()
    await deliver(hitl, request)
    await login(client, team.tokens["alice"])
    response = await client.post(f"/api/approvals/{request.request_id}", json={"approved": True, "reason": "LGTM"})
    assert response.status_code == 200, response.text
    assert response.json() == {"request_id": str(request.request_id), "state": "approved"}

    (reply,) = replies(sq, "approval_responses_singularity_1")
    assert reply["request_id"] == str(request.request_id)
    assert reply["recipient"] == "singularity_1"
    assert (reply["approved"], reply["reason"], reply["decided_by"]) == (True, "LGTM", "alice")
    assert await state(hitl, request.request_id) == ("approved", "alice")
    assert await audit(hitl, request.request_id) == [
        ("received", "system", {"queue": "approval_requests"}),
        ("approved", "alice", {"approved": True, "reason": "LGTM"}),
    ]
    assert await hitl.pending() == []

    again = await client.post(f"/api/approvals/{request.request_id}", json={"approved": False, "reason": "wait"})
    assert again.status_code == 409
    assert again.json()["error"] == "already decided (approved by alice)"
    assert len(replies(sq, "approval_responses_singularity_1")) == 1


async def test_a_rejection_needs_a_reason_and_then_sends_it(client, hitl, sq):
    request = approval()
    await deliver(hitl, request)
    url = f"/api/approvals/{request.request_id}"
    for body in ({"approved": False}, {"approved": False, "reason": "   "}):
        response = await client.post(url, json=body, headers=BEARER)
        assert response.status_code == 422
        assert "reason" in response.json()["error"]
    assert replies(sq, "approval_responses_singularity_1") == []
    assert await state(hitl, request.request_id) == ("pending", None)

    headers = BEARER | {"X-Reviewer": "carol"}  # a claim, not an identity: ignored
    response = await client.post(url, json={"approved": False, "reason": "touches prod config"}, headers=headers)
    assert response.json()["state"] == "rejected"
    (reply,) = replies(sq, "approval_responses_singularity_1")
    assert (reply["approved"], reply["reason"], reply["decided_by"]) == (False, "touches prod config", "shared-token")
    assert (await audit(hitl, request.request_id))[-1] == (
        "rejected",
        "shared-token",
        {"approved": False, "reason": "touches prod config"},
    )


async def test_answering_a_question_publishes_the_response(client, hitl, sq):
    request = question()
    await deliver(hitl, request)
    response = await client.post(
        f"/api/questions/{request.request_id}", json={"response": "8080, please"}, headers=BEARER
    )
    assert response.status_code == 200
    assert response.json() == {"request_id": str(request.request_id), "state": "answered"}
    (reply,) = replies(sq, "question_responses_singularity_1")
    assert reply["request_id"] == str(request.request_id) and reply["recipient"] == "singularity_1"
    assert (reply["response"], reply["answered_by"]) == ("8080, please", "shared-token")
    assert (await audit(hitl, request.request_id))[-1] == ("answered", "shared-token", {"response": "8080, please"})
    again = await client.post(f"/api/questions/{request.request_id}", json={"response": "no"}, headers=BEARER)
    assert again.status_code == 409 and again.json()["error"] == "already decided (answered by shared-token)"


async def test_bad_requests_get_a_4xx_with_the_reason(client, hitl):
    asked, change = question(), approval()
    await deliver(hitl, asked)
    await deliver(hitl, change)
    approve_url, answer_url = f"/api/approvals/{change.request_id}", f"/api/questions/{asked.request_id}"

    async def post(path: str, **kwargs: Any) -> tuple[int, str]:
        response = await client.post(path, headers=BEARER | kwargs.pop("headers", {}), **kwargs)
        return response.status_code, response.json()["error"]

    status, reason = await post(approve_url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert (status, reason) == (400, "the body is not valid JSON")
    status, reason = await post(approve_url, json={"approved": "yes"})
    assert status == 422 and reason.startswith("approved:")
    status, reason = await post(approve_url, json={"reason": "fine"})
    assert status == 422 and "approved: Field required" in reason
    status, reason = await post(approve_url, json={"approved": True, "approved_by": "me"})
    assert status == 422 and "approved_by" in reason
    status, reason = await post(approve_url, json=[True])
    assert status == 422
    status, reason = await post(answer_url, json={"response": ""})
    assert status == 422 and reason.startswith("response:")
    status, reason = await post(answer_url, json={"response": " \n "})
    assert status == 422 and reason.startswith("response:")
    status, reason = await post(answer_url, json={"response": 42})
    assert status == 422 and reason.startswith("response:")
    status, reason = await post("/api/approvals/not-a-uuid", json={"approved": True})
    assert (status, reason) == (404, "request_id must be a UUID")
    unknown = uuid.uuid4()
    status, reason = await post(f"/api/approvals/{unknown}", json={"approved": True})
    assert (status, reason) == (404, f"unknown request {unknown}")
    status, reason = await post(f"/api/approvals/{asked.request_id}", json={"approved": True})
    assert (status, reason) == (409, f"request {asked.request_id} is a question, not an approval")
    status, reason = await post(f"/api/questions/{change.request_id}", json={"response": "yes"})
    assert (status, reason) == (409, f"request {change.request_id} is an approval, not a question")
    # Oversized bodies are refused by every service's BodyLimit middleware while they stream: see
    # test_http_protection.py's test_a_huge_body_is_refused_while_it_streams, against a live Nexus.
    assert len(await hitl.pending()) == 2  # none of that decided anything


async def test_a_failed_publish_rolls_the_decision_back(hitl, sq):
    request = approval()
    await deliver(hitl, request)

    class DownQueue:
        async def publish(self, message: Any) -> int:
            raise psycopg.OperationalError("shared queue is down")

    broken = Hitl(hitl.store.pool, DownQueue())  # type: ignore[arg-type]
    with pytest.raises(psycopg.OperationalError):
        await broken.decide(request.request_id, True, "", "alice")
    app = Starlette(routes=broken.routes(TOKEN))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://nexus") as http:
        response = await http.post(f"/api/approvals/{request.request_id}", json={"approved": True}, headers=BEARER)
    assert response.status_code == 503 and "nothing was decided" in response.json()["error"]
    assert await state(hitl, request.request_id) == ("pending", None)
    assert [a[0] for a in await audit(hitl, request.request_id)] == ["received"]
    # The reviewer retries once the queue is back.
    await hitl.decide(request.request_id, True, "", "alice")
    assert len(replies(sq, "approval_responses_singularity_1")) == 1


async def test_two_reviewers_deciding_at_once_one_wins(hitl, sq):
    request = approval()
    await deliver(hitl, request)
    results = await asyncio.gather(
        hitl.decide(request.request_id, True, "", "alice"),
        hitl.decide(request.request_id, False, "no", "bob"),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["ApprovalResponse", "Conflict"]
    assert len(replies(sq, "approval_responses_singularity_1")) == 1
    assert [a[0] for a in await audit(hitl, request.request_id)] in (
        ["received", "approved"],
        ["received", "rejected"],
    )


# -- expiry and the audit trail ---------------------------------------------------------------------------


async def test_overdue_requests_expire(client, hitl, sq):
    overdue = approval(deadline=datetime.now(UTC) - timedelta(seconds=1))
    timely = question(deadline=datetime.now(UTC) + timedelta(hours=1))
    await deliver(hitl, overdue)
    await deliver(hitl, timely)
    assert len(await hitl.pending()) == 2  # pending until the expiry job runs...
    with pytest.raises(Conflict, match="expired at"):  # ...but no longer decidable
        await hitl.decide(overdue.request_id, True, "", "alice")

    assert await hitl.expire_overdue() == 1
    body = (await client.get("/api/pending", headers=BEARER)).json()
    assert body["approvals"] == [] and [c["request_id"] for c in body["questions"]] == [str(timely.request_id)]
    assert await state(hitl, overdue.request_id) == ("expired", "system")
    assert [(a[0], a[1]) for a in await audit(hitl, overdue.request_id)] == [
        ("received", "system"),
        ("expired", "system"),
    ]
    assert await hitl.expire_overdue() == 0
    late = await client.post(f"/api/approvals/{overdue.request_id}", json={"approved": True}, headers=BEARER)
    assert late.status_code == 409 and late.json()["error"].startswith("already decided (expired at ")
    assert replies(sq, "approval_responses_singularity_1") == []


async def test_the_audit_trail_is_append_only(hitl):
    request = approval()
    await deliver(hitl, request)
    for statement in ("UPDATE hitl_audit SET actor = 'mallory'", "DELETE FROM hitl_audit"):
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            await rows(hitl, statement + " WHERE request_id = %s RETURNING id", request.request_id)
    assert [a[1] for a in await audit(hitl, request.request_id)] == ["system"]


# -- push ------------------------------------------------------------------------------------------------


async def next_event(ws: ClientConnection, timeout: float = 5.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def test_a_request_is_announced_only_after_its_transaction_commits(hitl):
    """Hitl registers the announcement with the consumer's after-commit hook, never announces it itself."""
    with hitl.broadcaster.subscribe() as inbox:
        request = approval()
        callbacks: list[Callable[[], object]] = []
        async with hitl.store.pool.connection() as conn, conn.transaction():
            await hitl.receive(conn, request, request.reply_to, callbacks.append)
            await conn.execute("SELECT 1")  # a round trip: anything receive() scheduled has had its turn
            marker = {"type": "marker"}
            hitl.broadcaster.publish(marker)  # inboxes are FIFO: an earlier announcement would come first
            assert inbox.get_nowait() == marker, "announced before commit"
        assert inbox.empty() and len(callbacks) == 1
        callbacks[0]()  # what the consumer does once the transaction has committed
        event = await asyncio.wait_for(inbox.get(), 5)
        assert event["type"] == "added" and event["card"]["request_id"] == str(request.request_id)
    assert [c["request_id"] for c in await hitl.pending()] == [str(request.request_id)]


async def test_every_browser_sees_additions_and_decisions_live(hitl, named_app, team):
    earlier = question()
    await deliver(hitl, earlier)
    async with serving(named_app) as host, httpx.AsyncClient(base_url=f"http://{host}") as http:
        await login(http, team.tokens["alice"])
        cookie = {"Cookie": f"{SESSION_COOKIE}={http.cookies[SESSION_COOKIE]}"}
        async with (
            connect(f"ws://{host}/ws", additional_headers=cookie) as first,
            connect(f"ws://{host}/ws", additional_headers=team.bearer("bob")) as second,
        ):
            for ws, reviewer in ((first, "alice"), (second, "bob")):
                snapshot = await next_event(ws)
                assert snapshot["type"] == "snapshot" and snapshot["reviewer"] == reviewer
                assert snapshot["approvals"] == [] and snapshot["questions"][0]["request_id"] == str(earlier.request_id)

            request = approval(description="<script>window.__pwned = 1</script>")
            await deliver(hitl, request)
            for ws in (first, second):
                added = await next_event(ws)
                assert added["type"] == "added"
                assert added["card"]["request_id"] == str(request.request_id)
                assert added["card"]["description"] == request.description

            response = await http.post(f"/api/approvals/{request.request_id}", json={"approved": True})
            assert response.status_code == 200
            for ws in (first, second):
                assert await next_event(ws) == {
                    "type": "removed",
                    "request_id": str(request.request_id),
                    "state": "approved",
                    "by": "alice",
                }

            overdue = approval(deadline=datetime.now(UTC) - timedelta(seconds=1))
            await deliver(hitl, overdue)
            for ws in (first, second):
                assert (await next_event(ws))["type"] == "added"
            assert await hitl.expire_overdue() == 1
            for ws in (first, second):
                assert await next_event(ws) == {
                    "type": "removed",
                    "request_id": str(overdue.request_id),
                    "state": "expired",
                    "by": "system",
                }


async def test_the_websocket_refuses_strangers_and_other_sites(hitl):
    app = Starlette(routes=hitl.routes(TOKEN))
    async with serving(app) as host, httpx.AsyncClient(base_url=f"http://{host}") as http:
        await login(http)
        cookie = f"{SESSION_COOKIE}={http.cookies[SESSION_COOKIE]}"
        attempts = [
            (f"ws://{host}/ws", {}, 4401),
            (f"ws://{host}/ws?token={TOKEN}", {}, 4401),  # no tokens in URLs: they end up in access logs
            (f"ws://{host}/ws", {"Authorization": "Bearer wrong"}, 4401),
            (f"ws://{host}/ws", {"Cookie": cookie + "x"}, 4401),
            (f"ws://{host}/ws", {"Cookie": cookie, "Origin": "https://evil.example"}, 4403),
        ]
        for url, headers, code in attempts:
            async with connect(url, additional_headers=headers) as ws:
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == code, (url, headers)
        async with connect(f"ws://{host}/ws", additional_headers={"Cookie": cookie, "Origin": f"http://{host}"}) as ws:
            assert (await next_event(ws))["type"] == "snapshot"

"""Every HTTP entry point refuses strangers and hostile requests (service/guard.py, service/body_limit.py).

Each service runs as its own real process (`singularity-stack run`, uvicorn) on a provisioned stack;
the tests speak raw HTTP to it and check the server side: the task table, the HITL state, and the
server process's resident memory.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from live_services import (
    CENTRALCLOUD_TOKEN,
    NEXUS_TOKEN,
    SINGULARITY_TOKEN,
    LiveService,
    live_service,
)
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from singularity_stack import contract as c
from singularity_stack.provision.provisioner import ProvisionResult
from singularity_stack.sharedqueue import SharedQueue

MIB = 1 << 20
HOSTILE_BODY = 300 * MIB
# The server may hold one body up to the 1 MiB limit plus socket buffers; 300 MiB must not show.
RSS_SLACK_KIB = 6 * 1024


@pytest.fixture(scope="module")
def stack(provision_stack) -> ProvisionResult:
    return provision_stack(1)


@pytest.fixture(scope="module")
def singularity(stack: ProvisionResult) -> Iterator[LiveService]:
    with live_service(stack, "singularity_1") as service:
        yield service


@pytest.fixture(scope="module")
def nexus(stack: ProvisionResult) -> Iterator[LiveService]:
    with live_service(stack, "nexus") as service:
        yield service


@pytest.fixture(scope="module")
def centralcloud(stack: ProvisionResult) -> Iterator[LiveService]:
    with live_service(stack, "centralcloud") as service:
        yield service


@pytest.fixture(scope="module")
def genesis(stack: ProvisionResult) -> Iterator[LiveService]:
    with live_service(stack, "genesis") as service:
        yield service


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def task_count(stack: ProvisionResult) -> int:
    with psycopg.connect(stack.credentials["singularity_1"].database_url) as conn:
        (count,) = conn.execute("SELECT count(*) FROM tasks").fetchone()  # type: ignore[misc]
        return int(count)


def assert_json_error(response: httpx.Response, status: int, mentions: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert mentions in response.json()["error"], response.json()


# -- Host (DNS rebinding) ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["singularity", "nexus", "centralcloud", "genesis"])
def test_a_foreign_host_header_is_refused_everywhere(request, name: str) -> None:
    service: LiveService = request.getfixturevalue(name)
    token = {"singularity": SINGULARITY_TOKEN, "centralcloud": CENTRALCLOUD_TOKEN, "nexus": NEXUS_TOKEN}.get(name, "-")
    for path in ("/healthz", "/readyz", "/metrics", "/tasks", "/analytics", "/api/pending", "/"):
        for host in (f"rebind.example:{service.port}", "rebind.example", f"127.0.0.1.nip.io:{service.port}"):
            response = httpx.get(f"{service.url}{path}", headers={"Host": host, **bearer(token)})
            assert_json_error(response, 400, "host")
    assert httpx.get(f"{service.url}/healthz", headers={"Host": f"localhost:{service.port}"}).status_code == 200


def test_dns_rebinding_cannot_read_the_tasks(singularity: LiveService) -> None:
    created = httpx.post(
        f"{singularity.url}/tasks", json={"description": "secret work"}, headers=bearer(SINGULARITY_TOKEN)
    )
    assert created.status_code == 202, created.text
    response = httpx.get(f"{singularity.url}/tasks", headers={"Host": "attacker.example", **bearer(SINGULARITY_TOKEN)})
    assert_json_error(response, 400, "host")
    assert "secret work" not in response.text


def test_a_websocket_with_a_foreign_host_or_origin_is_refused(nexus: LiveService) -> None:
    for headers in ({"Host": "rebind.example"}, {"Origin": "http://evil.example"}, {"Origin": "null"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(f"ws://127.0.0.1:{nexus.port}/ws", additional_headers={**headers, **bearer(NEXUS_TOKEN)})
        assert refused.value.response.status_code == 403 or refused.value.response.status_code == 400
    # Same origin, with the token: accepted, and the snapshot comes.
    with connect(
        f"ws://127.0.0.1:{nexus.port}/ws",
        additional_headers={"Origin": f"http://127.0.0.1:{nexus.port}", **bearer(NEXUS_TOKEN)},
    ) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"


# -- Origin ------------------------------------------------------------------------------------------


def test_cross_origin_requests_are_refused_and_change_nothing(stack, singularity: LiveService) -> None:
    before = task_count(stack)
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{singularity.port + 1}", "http://localhost"):
        response = httpx.post(
            f"{singularity.url}/tasks",
            json={"description": "from another origin"},
            headers={"Origin": origin, **bearer(SINGULARITY_TOKEN)},
        )
        assert_json_error(response, 403, "origin")
    response = httpx.post(
        f"{singularity.url}/tasks",
        json={"description": "no Origin, but the browser says cross-site"},
        headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", **bearer(SINGULARITY_TOKEN)},
    )
    assert_json_error(response, 403, "sec-fetch-site")
    assert task_count(stack) == before
    same = httpx.post(
        f"{singularity.url}/tasks",
        json={"description": "from our own origin"},
        headers={"Origin": singularity.url, **bearer(SINGULARITY_TOKEN)},
    )
    assert same.status_code == 202, same.text
    assert task_count(stack) == before + 1


# -- authentication ----------------------------------------------------------------------------------


def test_the_task_api_needs_the_token(stack, singularity: LiveService) -> None:
    before = task_count(stack)
    for headers in ({}, bearer("wrong-token-of-the-same-size!!"), {"Authorization": SINGULARITY_TOKEN}):
        created = httpx.post(f"{singularity.url}/tasks", json={"description": "stranger"}, headers=headers)
        assert_json_error(created, 401, "authorization")
        assert created.headers["www-authenticate"] == "Bearer"
        assert_json_error(httpx.get(f"{singularity.url}/tasks", headers=headers), 401, "authorization")
        assert_json_error(httpx.get(f"{singularity.url}/tasks/{uuid.uuid4()}", headers=headers), 401, "authorization")
    assert task_count(stack) == before
    assert httpx.get(f"{singularity.url}/tasks", headers=bearer(SINGULARITY_TOKEN)).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):  # probes and Prometheus carry no token
        assert httpx.get(f"{singularity.url}{path}").status_code == 200


def test_the_analytics_api_and_page_need_the_token(centralcloud: LiveService) -> None:
    for path in ("/", "/analytics", "/prune-runs"):
        assert_json_error(httpx.get(f"{centralcloud.url}{path}"), 401, "authorization")
        assert_json_error(
            httpx.get(f"{centralcloud.url}{path}", headers=bearer(SINGULARITY_TOKEN)), 401, "authorization"
        )
        assert httpx.get(f"{centralcloud.url}{path}", headers=bearer(CENTRALCLOUD_TOKEN)).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{centralcloud.url}{path}").status_code == 200


# -- Content-Type ------------------------------------------------------------------------------------


def test_changes_must_be_json(stack, singularity: LiveService, nexus: LiveService) -> None:
    before = task_count(stack)
    body = json.dumps({"description": "a simple request"})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = bearer(SINGULARITY_TOKEN) | ({"Content-Type": content_type} if content_type else {})
        response = httpx.post(f"{singularity.url}/tasks", content=body, headers=headers)
        assert_json_error(response, 415, "content-type")
        decision = httpx.post(
            f"{nexus.url}/api/approvals/{uuid.uuid4()}",
            content=json.dumps({"approved": True}),
            headers=bearer(NEXUS_TOKEN) | ({"Content-Type": content_type} if content_type else {}),
        )
        assert_json_error(decision, 415, "content-type")
    assert task_count(stack) == before
    ok = httpx.post(
        f"{singularity.url}/tasks",
        content=body,
        headers={"Content-Type": "application/json; charset=utf-8", **bearer(SINGULARITY_TOKEN)},
    )
    assert ok.status_code == 202, ok.text


# -- body limit --------------------------------------------------------------------------------------


def send_hostile_body(service: LiveService, path: str, headers: dict[str, str], *, chunked: bool) -> bytes:
    """POST HOSTILE_BODY bytes (chunked, or under a Content-Length that says so); stop when the server
    answers or hangs up. Returns what the server said."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{service.port}", *(f"{k}: {v}" for k, v in headers.items())]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {HOSTILE_BODY}")
    piece = b"7" * (256 * 1024)
    frame = f"{len(piece):x}\r\n".encode() + piece + b"\r\n" if chunked else piece
    answer = b""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        try:
            while sent < HOSTILE_BODY:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(frame)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        deadline = time.monotonic() + 30
        while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
    return answer


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize(
    ("name", "path", "headers"),
    [
        ("singularity", "/tasks", {"Content-Type": "application/json", **bearer(SINGULARITY_TOKEN)}),
        ("nexus", "/login", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("nexus", f"/api/questions/{uuid.uuid4()}", {"Content-Type": "application/json", **bearer(NEXUS_TOKEN)}),
        ("centralcloud", "/analytics", {"Content-Type": "application/json", **bearer(CENTRALCLOUD_TOKEN)}),
        ("genesis", "/healthz", {"Content-Type": "application/json"}),
    ],
)
def test_a_huge_body_is_refused_while_it_streams(
    request, name: str, path: str, headers: dict[str, str], chunked: bool
) -> None:
    service: LiveService = request.getfixturevalue(name)
    httpx.get(f"{service.url}/metrics")  # warm up the code that answers
    before = service.rss_kib()
    answer = send_hostile_body(service, path, headers, chunked=chunked)
    grown = service.rss_kib() - before
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"application/json" in rest.lower()
    assert grown < RSS_SLACK_KIB, f"{name} grew by {grown} KiB reading a hostile body"
    assert httpx.get(f"{service.url}/healthz").status_code == 200


def test_a_body_within_the_limit_still_works(singularity: LiveService) -> None:
    files = {"big.txt": "x" * 900_000}
    response = httpx.post(
        f"{singularity.url}/tasks", json={"description": "big file", "files": files}, headers=bearer(SINGULARITY_TOKEN)
    )
    assert response.status_code == 202, response.text


# -- NUL and control characters ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"description": "print\\u0000hi"}', "description"),
        ('{"description": "lone \\ud800 surrogate"}', "description"),
        ('{"description": "ok", "files": {"a\\u0000.py": "x"}}', "files"),
        ('{"description": "ok", "files": {"a.py": "x\\u0000"}}', "files.a.py"),
        ('{"description": "ok", "files": {"a.py": "\\udfff"}}', "files.a.py"),
        ('{"description": "ok", "agent_id": "agent\\u0000"}', "agent_id"),
    ],
)
def test_nul_in_a_task_is_a_422_naming_the_field(stack, singularity: LiveService, body: str, field: str) -> None:
    before = task_count(stack)
    response = httpx.post(
        f"{singularity.url}/tasks",
        content=body,
        headers={"Content-Type": "application/json", **bearer(SINGULARITY_TOKEN)},
    )
    assert_json_error(response, 422, field)
    assert task_count(stack) == before


def test_other_control_characters_are_stored_faithfully(singularity: LiveService) -> None:
    text = "tab\there\x01\x1b[31m\x7f\u2028 done"
    created = httpx.post(
        f"{singularity.url}/tasks",
        json={"description": text, "files": {"ctl\x02.py": text}, "agent_id": "agent\x03"},
        headers=bearer(SINGULARITY_TOKEN),
    )
    assert created.status_code == 202, created.text
    task = httpx.get(f"{singularity.url}/tasks/{created.json()['id']}", headers=bearer(SINGULARITY_TOKEN)).json()
    assert task["description"] == text
    assert task["agent_id"] == "agent\x03"


async def publish_as_singularity(stack: ProvisionResult, message: c.Message) -> None:
    queue = SharedQueue(stack.credentials["singularity_1"].shared_queue_url)
    await queue.open()
    try:
        await queue.publish(message)
    finally:
        await queue.close()


def wait_pending(nexus: LiveService, kind: str, request_id: uuid.UUID) -> None:
    deadline = time.monotonic() + 30
    while True:
        pending = httpx.get(f"{nexus.url}/api/pending", headers=bearer(NEXUS_TOKEN)).json()[kind]
        if any(item["request_id"] == str(request_id) for item in pending):
            return
        assert time.monotonic() < deadline, f"{request_id} never became pending"
        time.sleep(0.1)


async def test_nul_in_a_decision_or_answer_is_a_422_and_loses_nothing(stack, nexus: LiveService) -> None:
    approval = c.ApprovalRequest(reply_to="singularity_1", agent_id="a", file_path="a.py", diff="+x", description="d")
    question = c.QuestionRequest(reply_to="singularity_1", agent_id="a", question="which?", context="")
    await publish_as_singularity(stack, approval)
    await publish_as_singularity(stack, question)
    await asyncio.to_thread(wait_pending, nexus, "approvals", approval.request_id)
    await asyncio.to_thread(wait_pending, nexus, "questions", question.request_id)
    async with httpx.AsyncClient(base_url=nexus.url, headers=bearer(NEXUS_TOKEN)) as http:
        for reason in ("no\x00", "lone \ud800"):
            body = json.dumps({"approved": False, "reason": reason})
            refused = await http.post(
                f"/api/approvals/{approval.request_id}", content=body, headers={"Content-Type": "application/json"}
            )
            assert_json_error(refused, 422, "reason")
        refused = await http.post(f"/api/questions/{question.request_id}", json={"response": "a\x00b"})
        assert_json_error(refused, 422, "response")
        # Still pending, and decided normally afterwards: nothing was lost.
        pending = (await http.get("/api/pending")).json()
        assert str(approval.request_id) in [a["request_id"] for a in pending["approvals"]]
        assert str(question.request_id) in [q["request_id"] for q in pending["questions"]]
        decided = await http.post(
            f"/api/approvals/{approval.request_id}", json={"approved": False, "reason": "ctl \x01"}
        )
        assert decided.status_code == 200, decided.text
        answered = await http.post(f"/api/questions/{question.request_id}", json={"response": "fine\x1b"})
        assert answered.status_code == 200, answered.text
    with psycopg.connect(stack.credentials["nexus"].database_url) as conn:
        details = [row[0] for row in conn.execute("SELECT detail FROM hitl_audit WHERE action <> 'received'")]
    assert any(d.get("reason") == "ctl \x01" for d in details), details


def test_nul_in_the_login_form_is_a_4xx(nexus: LiveService) -> None:
    for form in (f"token={NEXUS_TOKEN}%00&name=alice", f"token={NEXUS_TOKEN}&name=al%00ice", "token=%00&name=x"):
        response = httpx.post(
            f"{nexus.url}/login", content=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert 400 <= response.status_code < 500, response.text


# -- careless input ----------------------------------------------------------------------------------


def test_blank_text_is_refused_naming_the_field(stack, singularity: LiveService) -> None:
    before = task_count(stack)
    for body, field in (
        ({"description": "   "}, "description"),
        ({"description": ""}, "description"),
        ({"description": "\n\t "}, "description"),
        ({"description": "work", "agent_id": "  "}, "agent_id"),
        ({"description": "work", "files": {" ": "print(1)"}}, "files"),
    ):
        response = httpx.post(f"{singularity.url}/tasks", json=body, headers=bearer(SINGULARITY_TOKEN))
        assert_json_error(response, 422, field)
        assert "blank" in response.json()["error"] or body["description"] == "", response.json()
    assert task_count(stack) == before
    kept = httpx.post(
        f"{singularity.url}/tasks",
        json={"description": " padded work ", "files": {"a.py": ""}},
        headers=bearer(SINGULARITY_TOKEN),
    )
    assert kept.status_code == 202, kept.text  # text with words around spaces, and an empty file, are fine


@pytest.mark.parametrize("name", ["singularity", "nexus", "centralcloud", "genesis"])
def test_unknown_routes_and_methods_are_answered_in_json(request, name: str) -> None:
    service: LiveService = request.getfixturevalue(name)
    token = {"singularity": SINGULARITY_TOKEN, "centralcloud": CENTRALCLOUD_TOKEN, "nexus": NEXUS_TOKEN}.get(name, "-")
    missing = httpx.get(f"{service.url}/no/such/route", headers=bearer(token))
    assert_json_error(missing, 404, "path")
    wrong = httpx.post(f"{service.url}/healthz", json={}, headers=bearer(token))
    assert_json_error(wrong, 405, "POST")
    assert "GET" in wrong.headers["allow"]

"""The Genesis service: readiness tells when the sandbox cannot work on this host, and which bounds hold;
whatever a job prints reaches the requester."""

from __future__ import annotations

import asyncio

import httpx

from singularity_stack import contract as c
from singularity_stack.genesis import sandbox
from singularity_stack.genesis.runner import NUL_STANDIN
from singularity_stack.genesis.service import GenesisService, GenesisSettings


async def readyz(sq) -> httpx.Response:
    creds = sq.result.credentials["genesis"]
    service = GenesisService(GenesisSettings(database_url=creds.database_url, shared_queue_url=creds.shared_queue_url))
    await service.start()
    try:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app()), base_url="http://localhost")
        for _ in range(100):  # the NOTIFY listener connects in the background
            response = await client.get("/readyz")
            if response.status_code == 200 or "sandbox" in response.json().get("problems", {}):
                return response
            await asyncio.sleep(0.05)
        return response
    finally:
        await service.stop()


async def test_ready_when_the_sandbox_works(sq):
    response = await readyz(sq)
    assert response.status_code == 200, response.text


async def test_not_ready_and_says_why_when_bubblewrap_is_missing(sq, monkeypatch):
    monkeypatch.setattr(sandbox, "_find_system_tool", lambda name: None)
    response = await readyz(sq)
    assert response.status_code == 503
    assert "bubblewrap is not installed" in response.json()["problems"]["sandbox"]


async def test_readiness_says_which_bound_on_a_whole_job_is_in_force(sq, monkeypatch):
    response = await readyz(sq)
    assert response.json()["details"]["job_bounds"] == sandbox.job_bounds_in_force()
    monkeypatch.setattr(sandbox, "_job_cgroup_tree", None)
    monkeypatch.setenv("GENESIS_SANDBOX_CGROUP", "off")
    stated = (await readyz(sq)).json()["details"]["job_bounds"]
    assert stated.startswith("no cgroup per job (GENESIS_SANDBOX_CGROUP=off)") and "oom_score_adj 1000" in stated


async def test_whatever_bytes_a_job_prints_reach_the_requester_as_its_result(sq):
    """jsonb refuses U+0000: a job printing NUL once made the reply fail to publish, five re-runs, a dead letter."""
    code = "import sys\nsys.stdout.buffer.write(b'x\\x00y\\xff\\x07')\nsys.stderr.buffer.write(b'\\x00')\n"
    request = c.JobRequest(reply_to="singularity_1", agent_id="a-1", code=code, language="python", run=True)
    sender = await sq.queue("singularity_1")
    await sender.publish(request)
    creds = sq.result.credentials["genesis"]
    service = GenesisService(GenesisSettings(database_url=creds.database_url, shared_queue_url=creds.shared_queue_url))
    await service.start()
    try:
        deadline = asyncio.get_running_loop().time() + 120  # three sandboxes; generous for a loaded machine
        while not (replies := sq.owner_query("SELECT message FROM pgmq.q_job_results_singularity_1")):
            assert asyncio.get_running_loop().time() < deadline, "no reply"
            await asyncio.sleep(0.05)
    finally:
        await service.stop()
    [(reply,)] = replies
    assert (reply["request_id"], reply["status"]) == (str(request.request_id), "ok")
    assert (reply["output"], reply["error"]) == (f"x{NUL_STANDIN}y\ufffd\x07", NUL_STANDIN)
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_job_requests_dlq") == [(0,)]
    assert sq.owner_query("SELECT read_ct FROM pgmq.a_job_requests") == [(1,)]  # handled at the first read

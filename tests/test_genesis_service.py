"""The Genesis service: readiness tells when the sandbox cannot work on this host."""

from __future__ import annotations

import asyncio

import httpx

from singularity_stack.genesis import sandbox
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

"""Every line a service process writes is one JSON object, with no terminal colour codes.

Nexus imports litellm, which installs its own handlers and colours at import: a real
`singularity-stack run nexus` process answers an LLM request, and its whole output is checked.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from live_services import LiveService, live_service

from singularity_stack import contract as c
from singularity_stack.provision.provisioner import ProvisionResult
from singularity_stack.sharedqueue import SharedQueue


@pytest.fixture(scope="module")
def stack(provision_stack) -> ProvisionResult:
    return provision_stack(1)


@pytest.fixture(params=["INFO", "DEBUG"])
def nexus(request: pytest.FixtureRequest, stack: ProvisionResult) -> Iterator[LiveService]:
    with live_service(stack, "nexus", LOG_LEVEL=request.param) as service:
        yield service


async def answer_one_llm_request(stack: ProvisionResult) -> c.LlmResult:
    queue = await SharedQueue(stack.credentials["singularity_1"].shared_queue_url).open()
    try:
        request = c.LlmRequest(
            reply_to="singularity_1",
            agent_id="logs",
            task_type="chat",
            messages=[{"role": "user", "content": "say hello"}],
        )
        await queue.publish(request)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for raw in await queue.read("llm_results_singularity_1", visibility_timeout=30, limit=10):
                reply = c.LlmResult.model_validate_json(raw.body)
                if reply.request_id == request.request_id:
                    return reply
            await asyncio.sleep(0.2)
        raise AssertionError("no LLM reply")
    finally:
        await queue.close()


async def test_every_line_nexus_writes_is_one_json_object_without_colour(stack, nexus: LiveService) -> None:
    reply = await answer_one_llm_request(stack)
    assert reply.error is None, reply
    nexus.process.terminate()
    nexus.process.wait(30)
    lines = nexus.log.read_text().splitlines()
    assert lines, "nexus wrote nothing"
    for line in lines:
        record = json.loads(line)
        assert "\x1b[" not in json.dumps(record, ensure_ascii=False), line
        assert isinstance(record, dict), line
        assert record["service"] == "nexus", line
        assert "<object object" not in line, line

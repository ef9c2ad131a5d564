"""The NATS path when things break: a reader killed mid-message, nats-server restarted under load."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import nats.errors
import pytest
from nats_support import llm_request, nats_settled, open_dual, until

from singularity_stack.sharedqueue import nats_subjects as subjects

CHILD = Path(__file__).with_name("nats_reader_child.py")


@pytest.mark.parametrize("mode", ["in_handler", "after_commit"])
async def test_a_reader_killed_mid_message_has_it_redelivered_and_handled_once(open_stack, nats_for, mode):
    """Killed inside the handler, the transaction rolls back and the redelivery handles the message; killed after
    the commit but before the ack, the redelivery finds the claim and only archives and acknowledges it."""
    dual = await open_dual(open_stack, nats_for, ack_wait=1.0)
    request = llm_request("singularity_1")
    await dual.nats_publish(request)
    settings = {
        "instances": dual.layout.instances,
        "prefix": dual.layout.prefix,
        "nats_url": dual.nats.server.url,
        "nats_password": dual.nats.passwords["nexus"],
        "shared_queue_url": dual.stack.url("nexus"),
        "database_url": dual.stack.db_url("nexus"),
        "mode": mode,
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), json.dumps(settings), stdout=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            line = await child.stdout.readline()
        assert line.strip() == (b"IN_HANDLER" if mode == "in_handler" else b"COMMITTED")
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    duplicates_before = nats_settled("llm_requests", "duplicate")
    handled_before = nats_settled("llm_requests", "handled")
    reader = dual.reader()
    await until(
        lambda: (
            nats_settled("llm_requests", "duplicate") + nats_settled("llm_requests", "handled")
            > duplicates_before + handled_before
        ),
        reader.run_once,
        timeout=60,  # the redelivery comes after the consumer's ack wait; a loaded machine may take a while
    )
    if mode == "in_handler":
        # The child's effect was rolled back with its transaction; this one is the second delivery's.
        assert dual.effects() == [(request.request_id, "singularity_1", "nats", 2)]
        assert nats_settled("llm_requests", "handled") == handled_before + 1
    else:
        assert dual.effects() == [(request.request_id, "singularity_1", "nats", 1)]
        assert nats_settled("llm_requests", "duplicate") == duplicates_before + 1
    archived = dual.stack.owner_query("SELECT message->>'request_id' FROM pgmq.a_llm_requests")
    assert archived == [(str(request.request_id),)]
    assert await dual.stream_messages("llm_requests") == 0


async def test_nats_server_restarted_under_load_loses_nothing(open_stack, nats_for):
    dual = await open_dual(open_stack, nats_for, ack_wait=2.0)
    requests = [llm_request("singularity_1") for _ in range(150)]
    subject = subjects.request_subject(dual.layout, "llm_requests", "singularity_1")
    publisher = (await dual.nats.connect("singularity_1")).jetstream()
    stop = asyncio.Event()
    reading = asyncio.create_task(dual.reader(batch_size=10, concurrency=3).run(stop))
    restarted = None
    try:
        for index, request in enumerate(requests):
            # A publisher that retries until JetStream acknowledges: a retry after a lost ack stores a copy,
            # which the reader's claims make harmless.
            while True:
                try:
                    await publisher.publish(subject, request.model_dump_json().encode(), timeout=1.0)
                    break
                except (TimeoutError, nats.errors.Error):
                    await asyncio.sleep(0.05)
            if index == len(requests) // 3:
                restarted = asyncio.create_task(asyncio.to_thread(dual.nats.server.restart))
        assert restarted is not None
        await restarted
        await until(lambda: len(dual.effects()) >= len(requests), lambda: asyncio.sleep(0.05), timeout=90)
    finally:
        stop.set()
        await reading
    effects = dual.effects()
    assert sorted(row[0] for row in effects) == sorted(r.request_id for r in requests)  # each exactly once
    archived = dual.stack.owner_query(
        "SELECT DISTINCT message->>'request_id' FROM pgmq.a_llm_requests WHERE msg_id < 0"
    )
    assert len(archived) == len(requests)
    assert dual.nexus_nc.stats["reconnects"] >= 1  # the reader's connection did go through the restart

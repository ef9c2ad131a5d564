"""`up --messaging dual|cutover --nats-url URL`: the NATS passwords kept 0600 in the state directory, the
nats-server authorization block written beside them (included by a real nats-server's config), each service
given its own user, and a live `up --messaging dual` serving a NATS-only publisher on NATS."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import nats
import psycopg
import pytest
from test_cli_up import CLI, start, stop

from singularity_stack import contract as c
from singularity_stack.local import lifecycle
from singularity_stack.local import nats as local_nats
from singularity_stack.local.supervisor import Messaging, plan_services
from singularity_stack.provision.credentials import ServiceCredentials
from singularity_stack.sharedqueue import nats_subjects as subjects
from singularity_stack.topology import StackLayout
from singularity_stack_testing.nats import NatsServer


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("mode", "url", "says"),
    [
        ("dual", None, "--messaging dual needs --nats-url nats://HOST:PORT"),
        ("cutover", "http://nats:4222", "--messaging cutover needs --nats-url nats://HOST:PORT"),
        ("pgmq", "nats://127.0.0.1:4222", "--nats-url needs --messaging dual or cutover"),
        ("both", "nats://127.0.0.1:4222", "--messaging both: one of pgmq, dual, cutover"),
    ],
)
def test_a_mode_and_url_that_do_not_go_together_are_refused_in_one_line(mode, url, says):
    with pytest.raises(lifecycle.UpError, match="^" + says):
        local_nats.check(mode, url)


def test_up_without_a_nats_url_stops_before_starting_anything(open_tmp):
    done = subprocess.run(
        [*CLI, "up", "--messaging", "dual", "--state-dir", str(open_tmp / "stack")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == lifecycle.EXIT_FAILED
    assert done.stderr.strip().splitlines() == [
        "error: --messaging dual needs --nats-url nats://HOST:PORT (the platform's nats-server)"
    ]
    assert "starting PostgreSQL" not in done.stdout


def test_passwords_are_kept_private_and_the_same_across_runs(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    layout = StackLayout(2)
    first, written = local_nats.messaging(state, layout, "dual", "nats://127.0.0.1:4222")
    again, _ = local_nats.messaging(state, layout, "dual", "nats://127.0.0.1:4222")
    assert first.passwords == again.passwords and set(first.passwords) == set(layout.owners)
    assert len(set(first.passwords.values())) == len(layout.owners)  # each its own
    assert written is not None
    assert mode_of(state / local_nats.PASSWORDS_FILE) == 0o600 and mode_of(written) == 0o600
    grown, _ = local_nats.messaging(state, StackLayout(3), "dual", "nats://127.0.0.1:4222")
    assert {k: grown.passwords[k] for k in first.passwords} == first.passwords  # a new instance, the rest kept
    assert local_nats.messaging(state, layout, "pgmq", None) == (Messaging(), None)


def test_each_service_gets_its_own_nats_user_in_dual_and_none_in_pgmq(tmp_path):
    layout = StackLayout(2)
    creds = {
        name: ServiceCredentials(database_url=f"postgresql:///{name}", shared_queue_url="postgresql:///sq")
        for name in layout.owners
    }
    messaging = Messaging("dual", "nats://10.0.0.1:4222", {name: f"password-of-{name}" for name in layout.owners})
    plans = plan_services(creds, tmp_path, instances=2, ui_token="t" * 20, source_env={}, messaging=messaging)
    for plan in plans:
        logical = plan.name
        assert plan.env["MESSAGING_MODE"] == "dual" and plan.env["NATS_URL"] == "nats://10.0.0.1:4222"
        assert plan.env["NATS_PASSWORD"] == f"password-of-{logical}"
        assert plan.env["SINGULARITY_INSTANCES"] == "2"
    source = {"MESSAGING_MODE": "dual", "NATS_PASSWORD": "stolen-from-the-environment"}
    for plan in plan_services(creds, tmp_path, instances=2, ui_token="t" * 20, source_env=source):
        assert not {"MESSAGING_MODE", "NATS_URL", "NATS_PASSWORD"} & set(plan.env)  # never from up's environment


def nats_server_including(server: NatsServer, state: Path) -> NatsServer:
    """`server` (its ports and directory) configured the way the README says: its own config including the
    file `up` wrote (nats-server resolves includes relative to the config file)."""
    include = os.path.relpath(state / local_nats.AUTHORIZATION_FILE, server.dir)
    server.config_file.write_text(
        f"host: 127.0.0.1\nport: {server.port}\nhttp_port: {server.monitor_port}\n"
        f'jetstream {{ store_dir: "{server.dir / "store"}" }}\ninclude "{include}"\n'
    )
    return server


async def test_the_authorization_file_is_what_nats_server_includes(nats_binary, tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    layout = StackLayout(2)
    messaging, _ = local_nats.messaging(state, layout, "dual", "nats://127.0.0.1:1")
    with nats_server_including(NatsServer([], binary=nats_binary), state) as server:
        for logical in layout.owners:
            nc = await nats.connect(
                server.url,
                user=subjects.user(layout, logical),
                password=messaging.passwords[logical],
                inbox_prefix=subjects.inbox_prefix(layout, logical),
                allow_reconnect=False,
            )
            await nc.close()
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(server.url, user="nexus", password="not-its-password", allow_reconnect=False)


async def test_a_live_dual_stack_answers_a_nats_only_publisher_on_nats(open_tmp, nats_binary):
    state = open_tmp / "stack"
    server = NatsServer([], binary=nats_binary)  # its port now; started once `up` wrote the users
    state_file = open_tmp / "state.json"
    process, output = start(state, 1, "--state-file", str(state_file), "--messaging", "dual", "--nats-url", server.url)
    try:
        assert f"messaging dual with {server.url}; its nats-server must include" in output
        nats_server_including(server, state).start()
        layout = StackLayout(1)
        passwords = json.loads((state / local_nats.PASSWORDS_FILE).read_text())
        nc = await nats.connect(
            server.url,
            user="singularity_1",
            password=passwords["singularity_1"],
            inbox_prefix=subjects.inbox_prefix(layout, "singularity_1"),
        )
        js = nc.jetstream()
        stream = subjects.stream(layout, "llm_results_singularity_1")
        deadline = time.monotonic() + 60
        while True:  # CentralCloud creates the streams once it is connected
            try:
                await js.consumer_info(stream, "singularity_1")
                break
            except nats.js.errors.NotFoundError:
                assert time.monotonic() < deadline, "CentralCloud never created the streams"
                await asyncio.sleep(0.5)
        request = c.LlmRequest(
            reply_to="singularity_1", agent_id="a", task_type="chat", messages=[{"role": "user", "content": "hi"}]
        )
        await js.publish(
            subjects.request_subject(layout, "llm_requests", "singularity_1"), request.model_dump_json().encode()
        )
        # Nexus answers on NATS, and the live Singularity reads its NATS reply stream: the reply is consumed
        # and archived once, with the NATS path (it waits for no step, so nothing else happens).
        assert json.loads(state_file.read_text())["messaging"]["mode"] == "dual"
        owner = json.loads((state / "credentials.json").read_text())["centralcloud"]["shared_queue_url"]
        deadline = time.monotonic() + 90
        while True:
            with psycopg.connect(owner) as conn:
                rows = conn.execute(
                    "SELECT message->>'request_id', headers->>'path' FROM pgmq.a_llm_results_singularity_1"
                ).fetchall()
            if rows:
                break
            assert time.monotonic() < deadline, "no reply archived"
            await asyncio.sleep(0.5)
        assert rows == [(str(request.request_id), "nats")]
        await asyncio.sleep(1.0)  # the stream's message is acknowledged after the archive write
        consumer = await js.consumer_info(stream, "singularity_1")
        assert (consumer.num_pending, consumer.num_ack_pending) == (0, 0)
        await nc.close()
    finally:
        stop(process)
        server.remove()

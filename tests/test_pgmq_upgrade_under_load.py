"""pgmq upgrades under live traffic: services keep sending, reading and archiving while the next provisioning
run swaps pgmq 1.11.1 (the real SQL of PyPI pgmq 1.1.3) for the packaged one. Nothing sent is lost, the
services' long-lived connections (with prepared pgmq.send/read/archive) keep working on the new schema, and
an upgrade that cannot get its locks says so, changes nothing and succeeds on the next run.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile

import psycopg
import pytest
from test_pgmq_upgrade import NEW, OLD, OLD_WHEEL, provision_on_old_pgmq

from singularity_stack.postgres.pgmq_install import installed_pgmq
from singularity_stack.provision.errors import ProvisionError
from singularity_stack.provision.provisioner import Provisioner, with_database


@pytest.fixture(scope="module")
def old_sql() -> str:
    if not OLD_WHEEL.exists():
        pytest.fail(f"{OLD_WHEEL} is missing: run scripts/setup.sh --test (it downloads pgmq 1.1.3)", pytrace=False)
    with zipfile.ZipFile(OLD_WHEEL) as wheel:
        return wheel.read("pgmq/sql/pgmq.sql").decode()


class Traffic:
    """A sender (singularity_1) and a consumer (Nexus), each on one long-lived connection, in a loop."""

    def __init__(self, url: dict[str, str]) -> None:
        self.url = url
        self.stop = threading.Event()
        self.sent: list[int] = []
        self.archived: list[int] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._send), threading.Thread(target=self._consume)]

    def _send(self) -> None:
        with psycopg.connect(self.url["singularity_1"], autocommit=True) as conn:
            n = 0
            while not self.stop.is_set():
                try:
                    row = conn.execute(
                        "SELECT * FROM pgmq.send('llm_requests', %s::jsonb)", (json.dumps({"n": n}),), prepare=True
                    ).fetchone()
                except psycopg.Error as error:
                    self.errors.append(f"send: {error}")
                    time.sleep(0.05)
                    continue
                assert row is not None
                self.sent.append(row[0])
                n += 1

    def _consume(self) -> None:
        with psycopg.connect(self.url["nexus"], autocommit=True) as conn:
            while not self.stop.is_set():
                try:
                    ids = [
                        r[0] for r in conn.execute("SELECT msg_id FROM pgmq.read('llm_requests', 30, 5)", prepare=True)
                    ]
                    for msg_id in ids:
                        done = conn.execute("SELECT pgmq.archive('llm_requests', %s)", (msg_id,), prepare=True)
                        row = done.fetchone()
                        if row and row[0]:
                            self.archived.append(msg_id)
                except psycopg.Error as error:
                    self.errors.append(f"consume: {error}")
                    time.sleep(0.05)

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a service connection is stuck"


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_nothing_sent_during_the_upgrade_is_lost_and_prepared_connections_keep_working(
    admin_dsn,
    old_sql,
    monkeypatch,
):
    old = provision_on_old_pgmq(admin_dsn, "pgload1_", old_sql, monkeypatch)
    url = {name: creds.shared_queue_url for name, creds in old.credentials.items()}
    shared = with_database(admin_dsn, old.layout.shared_queue_database)
    with Traffic(url) as traffic:
        wait_for(lambda: len(traffic.archived) > 20)  # prepared (psycopg prepares after 5 runs; here at once)
        again = Provisioner(admin_dsn, old.layout, report=lambda _: None, known_passwords=old.passwords).run()
        assert again.pgmq.version == NEW
        sent_at_upgrade, archived_at_upgrade = len(traffic.sent), len(traffic.archived)
        wait_for(lambda: len(traffic.sent) > sent_at_upgrade + 20 and len(traffic.archived) > archived_at_upgrade + 20)
    with psycopg.connect(shared) as conn:
        assert installed_pgmq(conn).version == NEW
        queued = {r[0] for r in conn.execute("SELECT msg_id FROM pgmq.q_llm_requests")}
        archived = {r[0] for r in conn.execute("SELECT msg_id FROM pgmq.a_llm_requests")}
    lost = set(traffic.sent) - queued - archived
    assert not lost, f"{len(lost)} of {len(traffic.sent)} messages sent during the upgrade are gone"
    assert not set(traffic.archived) & queued, "a message archived by the consumer is back in the queue"
    assert not traffic.errors, traffic.errors[:5]


def test_an_upgrade_that_cannot_get_its_locks_changes_nothing_and_the_next_run_upgrades(
    admin_dsn,
    old_sql,
    monkeypatch,
):
    old = provision_on_old_pgmq(admin_dsn, "pgload2_", old_sql, monkeypatch)
    shared = with_database(admin_dsn, old.layout.shared_queue_database)
    monkeypatch.setattr("singularity_stack.provision.pgmq_upgrade.LOCK_TIMEOUT", "300ms")
    url = old.credentials["nexus"].shared_queue_url
    with psycopg.connect(url) as holder:  # a service's transaction left open on a queue
        holder.execute("SELECT * FROM pgmq.read('llm_requests', 30, 1)").fetchall()
        with pytest.raises(ProvisionError) as postponed:
            Provisioner(admin_dsn, old.layout, report=lambda _: None, known_passwords=old.passwords).run()
        assert "postponed" in str(postponed.value) and "next provisioning run tries again" in str(postponed.value)
        holder.execute("SELECT 1")  # the service's connection is unharmed
        holder.commit()
    with psycopg.connect(shared) as conn:
        assert installed_pgmq(conn).version == OLD
        assert conn.execute("SELECT to_regnamespace('pgmq_before_upgrade')").fetchone()[0] is None
    again = Provisioner(admin_dsn, old.layout, report=lambda _: None, known_passwords=old.passwords).run()
    assert again.pgmq.version == NEW


def test_after_the_upgrade_listeners_dead_letters_analytics_and_extra_queues_are_as_before(
    admin_dsn,
    old_sql,
    monkeypatch,
):
    old = provision_on_old_pgmq(admin_dsn, "pgload3_", old_sql, monkeypatch)
    layout = old.layout
    shared = with_database(admin_dsn, layout.shared_queue_database)
    creds = old.credentials
    url = {name: entry.shared_queue_url for name, entry in creds.items()}
    analytics_url = creds["centralcloud"].shared_queue_analytics_url
    assert analytics_url
    nexus_role, analytics_role = layout.role("nexus"), layout.analytics_role
    with psycopg.connect(url["centralcloud"], autocommit=True) as cc:
        # a queue a team added by hand, outside the layout, with its notification and grants
        cc.execute("SELECT pgmq.create('team_extra')")
        cc.execute("SELECT pgmq.enable_notify_insert('team_extra', 250)")
        cc.execute(f'GRANT INSERT, SELECT, UPDATE, DELETE ON pgmq.q_team_extra TO "{nexus_role}"')
        cc.execute(f'GRANT INSERT, SELECT ON pgmq.a_team_extra TO "{nexus_role}"')
        cc.execute(f'GRANT SELECT ON pgmq.a_team_extra TO "{analytics_role}"')
        cc.execute("SELECT pgmq.send('team_extra', '{\"extra\": 1}')")
        cc.execute("SELECT pgmq.send('llm_requests_dlq', '{\"dead\": 1}')")
    with psycopg.connect(url["singularity_1"], autocommit=True) as sender:
        sender.execute("SELECT pgmq.send('llm_requests', '{\"n\": 0}')")
    with psycopg.connect(url["nexus"], autocommit=True) as nexus:
        first = nexus.execute("SELECT msg_id FROM pgmq.read('llm_requests', 30, 1)").fetchone()
        assert first is not None
        nexus.execute("SELECT pgmq.archive('llm_requests', %s)", (first[0],))

    listener = psycopg.connect(url["nexus"], autocommit=True)  # a consumer's LISTEN connection, kept open
    with listener:
        listener.execute('LISTEN "pgmq.q_llm_requests.INSERT"')
        listener.execute('LISTEN "pgmq.q_team_extra.INSERT"')
        again = Provisioner(admin_dsn, layout, report=lambda _: None, known_passwords=old.passwords).run()
        assert again.pgmq.version == NEW
        list(listener.notifies(timeout=0.5))  # whatever came before
        with psycopg.connect(url["singularity_1"], autocommit=True) as sender:
            sender.execute("SELECT pgmq.send('llm_requests', '{\"n\": 1}')")
        with psycopg.connect(url["nexus"], autocommit=True) as nexus:
            nexus.execute("SELECT pgmq.send('team_extra', '{\"extra\": 2}')")
        woken = {note.channel for note in listener.notifies(timeout=3, stop_after=2)}
    # the listener that was LISTENing before the swap is woken by the new tables' triggers
    assert woken == {"pgmq.q_llm_requests.INSERT", "pgmq.q_team_extra.INSERT"}

    with psycopg.connect(shared) as conn:
        assert conn.execute("SELECT count(*) FROM pgmq.q_llm_requests_dlq").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM pgmq.q_team_extra").fetchone() == (2,)
        throttle = dict(conn.execute("SELECT queue_name, throttle_interval_ms FROM pgmq.notify_insert_throttle"))
    assert throttle.get("team_extra") == 250  # the extra queue's notification setting is kept
    with psycopg.connect(analytics_url, autocommit=True) as analytics:
        assert analytics.execute("SELECT count(*) FROM pgmq.a_llm_requests").fetchone() == (1,)
        assert analytics.execute("SELECT count(*) FROM pgmq.a_team_extra").fetchone() == (0,)
    with psycopg.connect(url["nexus"], autocommit=True) as nexus:  # the extra queue's grants are kept
        extra = nexus.execute("SELECT msg_id FROM pgmq.read('team_extra', 30, 1)").fetchone()
        assert extra is not None
        assert nexus.execute("SELECT pgmq.archive('team_extra', %s)", (extra[0],)).fetchone() == (True,)


async def test_real_consumers_ride_out_the_upgrade_each_request_handled_once(admin_dsn, old_sql, monkeypatch):
    import asyncio
    import uuid

    from support import Stack

    from singularity_stack import contract as c
    from singularity_stack.sharedqueue import Consumer, Delivery, NotifyListener

    old = provision_on_old_pgmq(admin_dsn, "pgload4_", old_sql, monkeypatch)
    stack = Stack(old)
    try:
        singularity = await stack.queue("singularity_1")
        nexus = await stack.queue("nexus")
        store = await stack.store("nexus")
        committed: list[uuid.UUID] = []

        async def handle(delivery: Delivery[c.LlmRequest]) -> None:
            request_id = delivery.message.request_id
            delivery.after_commit(lambda: committed.append(request_id))

        listener = NotifyListener(stack.url("nexus"), ["llm_requests"])
        consumer = Consumer(nexus, "llm_requests", c.LlmRequest, handle, store=store, poll_interval=600)
        consumer.wakeup = listener.event("llm_requests")
        stop = asyncio.Event()
        tasks = [asyncio.create_task(listener.run()), asyncio.create_task(consumer.run(stop))]
        published: list[uuid.UUID] = []

        async def publish(n: int, pause: float = 0.005) -> None:
            for _ in range(n):
                request = c.LlmRequest(
                    reply_to="singularity_1",
                    agent_id="a",
                    task_type="coder",
                    messages=[{"role": "user", "content": "x"}],
                )
                await singularity.publish(request)
                published.append(request.request_id)
                await asyncio.sleep(pause)

        async def handled(count: int, timeout: float = 30) -> None:
            deadline = asyncio.get_running_loop().time() + timeout
            while len(set(committed)) < count:
                assert asyncio.get_running_loop().time() < deadline, f"{len(set(committed))} of {count} handled"
                await asyncio.sleep(0.05)

        await publish(30)
        await handled(30)
        provisioning = asyncio.create_task(
            asyncio.to_thread(
                Provisioner(admin_dsn, old.layout, report=lambda _: None, known_passwords=old.passwords).run
            )
        )

        async def publish_until_upgraded() -> None:
            while not provisioning.done():
                await publish(1, pause=0)

        await asyncio.gather(*(publish_until_upgraded() for _ in range(4)))  # as fast as four senders can
        assert (await provisioning).pgmq.version == NEW
        await publish(30)
        # the fallback poll is 600 s away: these are found because NOTIFY woke the consumer on the new tables
        await handled(len(published), timeout=90)
        stop.set()
        await asyncio.wait_for(tasks[1], 30)
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
    finally:
        await stack.close()
    assert sorted(committed) == sorted(published)  # each exactly once, none lost

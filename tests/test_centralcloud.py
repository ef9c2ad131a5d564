"""CentralCloud: queues ensured at start, retention pruning, analytics over the archives, queue metrics."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from psycopg import sql
from yoyo import get_backend, read_migrations
from yoyo.migrations import MigrationList

from singularity_stack import contract as c
from singularity_stack.centralcloud.service import CentralCloudService, CentralCloudSettings
from singularity_stack.provision.migrations import MIGRATIONS_ROOT, apply_migrations
from singularity_stack.sharedqueue import Consumer, Delivery

API_TOKEN = "centralcloud-test-api-token"


@pytest.fixture
async def central(sq):
    creds = sq.result.credentials["centralcloud"]
    settings = CentralCloudSettings(
        database_url=creds.database_url,
        shared_queue_url=creds.shared_queue_url,
        analytics_url=creds.shared_queue_analytics_url,
        stack_prefix=sq.result.layout.prefix,
        retention_days=30,
        prune_interval_seconds=3600,
        analytics_interval_seconds=3600,
        metrics_interval_seconds=3600,
        api_token=API_TOKEN,
    )
    service = CentralCloudService(settings)
    await service.start()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service.app()),
        base_url="http://localhost",
        headers={"Authorization": f"Bearer {API_TOKEN}"},
    )
    yield service, client
    await service.stop()


async def test_start_recreates_a_missing_queue_with_its_privileges(sq):
    with psycopg.connect(sq.owner_url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.drop_queue('job_requests')")
    creds = sq.result.credentials["centralcloud"]
    service = CentralCloudService(
        CentralCloudSettings(
            database_url=creds.database_url,
            shared_queue_url=creds.shared_queue_url,
            analytics_url=creds.shared_queue_analytics_url,
            stack_prefix=sq.result.layout.prefix,
            api_token=API_TOKEN,
        )
    )
    await service.start()
    await service.stop()
    singularity = await sq.queue("singularity_1")
    await singularity.publish(c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language="python"))
    assert sq.owner_query("SELECT count(*) FROM pgmq.q_job_requests") == [(1,)]


async def test_prune_removes_only_archives_older_than_retention(sq, central):
    service, client = central
    singularity = await sq.queue("singularity_1")
    for _ in range(5):
        await singularity.publish(c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language="python"))
    genesis = await sq.queue("genesis")
    batch = await genesis.read("job_requests", visibility_timeout=30, limit=5)
    await genesis.archive("job_requests", [m.msg_id for m in batch])
    old = [m.msg_id for m in batch[:3]]
    with psycopg.connect(sq.owner_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE pgmq.a_job_requests SET archived_at = now() - interval '31 days' WHERE msg_id = ANY(%s)", (old,)
        )
    pruned = await service.prune()
    assert pruned == {"job_requests": 3}
    assert sq.owner_query("SELECT count(*) FROM pgmq.a_job_requests") == [(2,)]
    runs = (await client.get("/prune-runs")).json()
    assert (runs[0]["pruned"], runs[0]["by_queue"], runs[0]["retention_days"]) == (3, {"job_requests": 3}, 30)
    assert await service.prune() == {}  # nothing left to prune


async def test_every_prune_run_is_recorded_even_one_that_pruned_nothing(sq, central):
    service, client = central
    deadline = asyncio.get_running_loop().time() + 30
    while not (await client.get("/prune-runs")).json():  # the run at start, with nothing to prune
        assert asyncio.get_running_loop().time() < deadline, "the prune run at start was never recorded"
        await asyncio.sleep(0.05)
    assert await service.prune() == {}
    assert await service.prune() == {}
    runs = (await client.get("/prune-runs")).json()
    assert [(r["pruned"], r["by_queue"], r["retention_days"]) for r in runs] == [(0, {}, 30)] * 3
    assert [r["ran_at"] for r in runs] == sorted((r["ran_at"] for r in runs), reverse=True)


def test_the_migration_makes_each_old_prune_run_one_row(pg_cluster, admin_dsn):
    """Before 0003 a run was one row per queue it pruned (one transaction: one ran_at); each becomes one run."""
    name = f"cc_migration_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = pg_cluster.dsn(name)
    try:
        backend = get_backend(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            every = read_migrations(str(MIGRATIONS_ROOT / "centralcloud"))
            with backend.lock():
                backend.apply_migrations(MigrationList([m for m in every if m.id < "0003"]))
        finally:
            backend.connection.close()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO prune_runs (ran_at, retention_days, queue, pruned) VALUES"
                " ('2026-11-01T00:00Z', 30, 'job_requests', 3), ('2026-11-01T00:00Z', 30, 'llm_requests', 2),"
                " ('2026-11-02T00:00Z', 30, 'job_requests', 1)"
            )
        apply_migrations("centralcloud", url)
        with psycopg.connect(url) as conn:
            runs = conn.execute("SELECT id, ran_at::date::text, retention_days, pruned FROM prune_runs ORDER BY id")
            rows = [tuple(r) for r in runs]
            queues = conn.execute("SELECT run_id, queue, pruned FROM prune_run_queues ORDER BY run_id, queue")
            by_queue = [tuple(r) for r in queues]
        assert [r[1:] for r in rows] == [("2026-11-01", 30, 5), ("2026-11-02", 30, 1)]
        first, second = rows[0][0], rows[1][0]
        assert by_queue == [(first, "job_requests", 3), (first, "llm_requests", 2), (second, "job_requests", 1)]
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


async def settle(consumer: Consumer) -> None:
    while await consumer.run_once():
        pass


async def test_analytics_learn_from_archives_and_are_served(sq, central):
    service, client = central
    singularity = await sq.queue("singularity_1")
    nexus = await sq.queue("nexus")
    genesis = await sq.queue("genesis")
    start = datetime.now(UTC) - timedelta(seconds=90)

    # three LLM requests answered by two models, one approval decided after 90 s, two jobs
    for task_type, model in (
        ("architect", "claude-opus"),
        ("architect", "claude-opus"),
        ("<script>x</script>", "offline"),
    ):
        request = c.LlmRequest(
            reply_to="singularity_1",
            agent_id="a",
            task_type=task_type,
            messages=[{"role": "user", "content": "q"}],
        )
        await singularity.publish(request)
        await nexus.publish(
            c.LlmResult(**c.reply_fields(request), result="a", model=model, complexity="complex", cost_usd=0.25)
        )
    approval = c.ApprovalRequest(reply_to="singularity_1", agent_id="a", file_path="x.py", diff="+x", created_at=start)
    await singularity.publish(approval)
    await nexus.publish(c.ApprovalResponse(**c.reply_fields(approval), approved=True))
    for language, status in (("python", c.JobStatus.OK), ("bash", c.JobStatus.TIMEOUT)):
        job = c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language=language)
        await singularity.publish(job)
        await genesis.publish(c.JobResult(**c.reply_fields(job), status=status, timings_ms={"run": 12.0}))

    async def archive(delivery: Delivery) -> None:
        pass

    for client_, role, queue, model in (
        (nexus, "nexus", "llm_requests", c.LlmRequest),
        (nexus, "nexus", "approval_requests", c.ApprovalRequest),
        (genesis, "genesis", "job_requests", c.JobRequest),
        (singularity, "singularity_1", "llm_results_singularity_1", c.LlmResult),
        (singularity, "singularity_1", "approval_responses_singularity_1", c.ApprovalResponse),
        (singularity, "singularity_1", "job_results_singularity_1", c.JobResult),
    ):
        await settle(Consumer(client_, queue, model, archive, store=await sq.store(role)))

    report = await service.learn()
    llm = {(r["task_type"], r["model"]): r for r in report["llm"]}
    assert llm[("architect", "claude-opus")]["requests"] == 2
    assert llm[("architect", "claude-opus")]["cost_usd"] == pytest.approx(0.5)
    assert llm[("architect", "claude-opus")]["complexity"] == "complex"
    assert report["approvals"]["approval_rate"] == 1.0
    assert report["approvals"]["median_response_seconds"] == pytest.approx(90, abs=5)
    jobs = {(r["language"], r["status"]): r["jobs"] for r in report["jobs"]}
    assert jobs == {("python", "ok"): 1, ("bash", "timeout"): 1}

    served = (await client.get("/analytics")).json()
    assert served["report"]["approvals"]["approved"] == 1
    html = (await client.get("/")).text
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>x" not in html


async def test_queue_depth_and_age_are_prometheus_metrics(sq, central):
    service, client = central
    singularity = await sq.queue("singularity_1")
    for _ in range(3):
        await singularity.publish(c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language="python"))
    await service.observe_queues()
    metrics = (await client.get("/metrics")).text
    assert 'singularity_queue_depth{queue="job_requests"} 3.0' in metrics
    assert 'singularity_queue_oldest_message_age_seconds{queue="job_requests"}' in metrics

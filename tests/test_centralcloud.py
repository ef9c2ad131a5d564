"""CentralCloud: queues ensured at start, retention pruning, analytics over the archives, queue metrics."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from psycopg import sql
from support import send_raw
from yoyo import get_backend, read_migrations
from yoyo.migrations import MigrationList

from singularity_stack import contract as c
from singularity_stack.centralcloud.service import CentralCloudService, CentralCloudSettings
from singularity_stack.centralcloud.store import REPORTS_KEPT
from singularity_stack.provision.migrations import MIGRATIONS_ROOT, apply_migrations
from singularity_stack.service.run import build_service
from singularity_stack.service.settings import SettingsError
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore, SharedQueue

API_TOKEN = "centralcloud-test-api-token"


def settings_for(sq, **overrides) -> CentralCloudSettings:
    creds = sq.result.credentials["centralcloud"]
    values: dict = {
        "database_url": creds.database_url,
        "shared_queue_url": creds.shared_queue_url,
        "analytics_url": creds.shared_queue_analytics_url,
        "stack_prefix": sq.result.layout.prefix,
        "retention_days": 30,
        # Each job runs once at start, then only when a test calls it (or the archives change, if asked).
        "prune_interval_seconds": 3600,
        "analytics_interval_seconds": 3600,
        "archive_check_interval_seconds": 3600,
        "metrics_interval_seconds": 3600,
        "api_token": API_TOKEN,
    }
    return CentralCloudSettings(**(values | overrides))


@pytest.fixture
async def central_with(sq) -> AsyncIterator[Callable[..., Awaitable[tuple[CentralCloudService, httpx.AsyncClient]]]]:
    """Start a CentralCloud with these settings over the test's stack; it stops at the end."""
    started: list[tuple[CentralCloudService, httpx.AsyncClient]] = []

    async def start(**overrides: object) -> tuple[CentralCloudService, httpx.AsyncClient]:
        service = CentralCloudService(settings_for(sq, **overrides))
        await service.start()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=service.app()),
            base_url="http://localhost",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )
        started.append((service, client))
        return service, client

    yield start
    for service, client in started:
        await client.aclose()
        await service.stop()


@pytest.fixture
async def central(central_with):
    return await central_with()


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


class Traffic:
    """Real messages through the stack's queues, consumed and archived as the services would: what the
    analytics read. Every request is answered (or dead-lettered) and archived by `archive_all`."""

    def __init__(self, sq) -> None:
        self.sq = sq
        self._queues: dict[str, SharedQueue] = {}
        self._stores: dict[str, IdempotencyStore] = {}

    async def queue(self, role: str) -> SharedQueue:
        if role not in self._queues:
            self._queues[role] = await self.sq.queue(role)
        return self._queues[role]

    async def llm(self, task_type: str, model: str, cost_usd: float) -> None:
        request = c.LlmRequest(
            reply_to="singularity_1", agent_id="a", task_type=task_type, messages=[{"role": "user", "content": "q"}]
        )
        await (await self.queue("singularity_1")).publish(request)
        reply = c.LlmResult(**c.reply_fields(request), result="a", model=model, complexity="complex", cost_usd=cost_usd)
        await (await self.queue("nexus")).publish(reply)

    async def approval(self, approved: bool, after_seconds: float) -> None:
        created = datetime.now(UTC) - timedelta(seconds=after_seconds)
        request = c.ApprovalRequest(
            reply_to="singularity_1", agent_id="a", file_path="x.py", diff="+x", created_at=created
        )
        await (await self.queue("singularity_1")).publish(request)
        await (await self.queue("nexus")).publish(
            c.ApprovalResponse(**c.reply_fields(request), approved=approved, reason="" if approved else "no")
        )

    async def job(self, language: str, status: c.JobStatus) -> None:
        job = c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language=language)
        await (await self.queue("singularity_1")).publish(job)
        reply = c.JobResult(**c.reply_fields(job), status=status, timings_ms={"run": 12.0})
        await (await self.queue("genesis")).publish(reply)

    def garbage(self, queue: str) -> None:
        """A message no consumer can read: it is dead-lettered to `<queue>_dlq` by `archive_all`."""
        send_raw(self.sq, "singularity_1", queue, {"not": "a message"})

    async def archive_all(self) -> None:
        async def archive(delivery: Delivery) -> None:
            pass

        for role, queue, model in (
            ("nexus", "llm_requests", c.LlmRequest),
            ("nexus", "approval_requests", c.ApprovalRequest),
            ("genesis", "job_requests", c.JobRequest),
            ("singularity_1", "llm_results_singularity_1", c.LlmResult),
            ("singularity_1", "approval_responses_singularity_1", c.ApprovalResponse),
            ("singularity_1", "job_results_singularity_1", c.JobResult),
        ):
            if role not in self._stores:
                self._stores[role] = await self.sq.store(role)
            consumer = Consumer(await self.queue(role), queue, model, archive, store=self._stores[role])
            while await consumer.run_once():
                pass


async def eventually(check: Callable[[], Awaitable[bool]], what: str, seconds: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.05)


async def test_analytics_learn_from_archives_and_are_served(sq, central):
    service, client = central
    traffic = Traffic(sq)
    # three LLM requests answered by two models, one approval decided after 90 s, two jobs
    for task_type, model in (
        ("architect", "claude-opus"),
        ("architect", "claude-opus"),
        ("<script>x</script>", "offline"),
    ):
        await traffic.llm(task_type, model, 0.25)
    await traffic.approval(True, 90)
    await traffic.job("python", c.JobStatus.OK)
    await traffic.job("bash", c.JobStatus.TIMEOUT)
    await traffic.archive_all()

    report = await service.learn()
    llm = {(r["task_type"], r["model"]): r for r in report["llm"]}
    assert llm[("architect", "claude-opus")]["requests"] == 2
    assert llm[("architect", "claude-opus")]["cost_usd"] == pytest.approx(0.5)
    assert llm[("architect", "claude-opus")]["complexity"] == "complex"
    assert report["approvals"]["approval_rate"] == 1.0
    assert report["approvals"]["median_response_seconds"] == pytest.approx(90, abs=5)
    jobs = {(r["language"], r["status"]): r["jobs"] for r in report["jobs"]}
    assert jobs == {("python", "ok"): 1, ("bash", "timeout"): 1}

    # over time: every request in a bucket of the chosen width, each decision with its response time
    over_time = report["llm_over_time"]
    assert sum(r["requests"] for r in over_time if r["model"] == "claude-opus") == 2
    assert sum(r["cost_usd"] for r in over_time) == pytest.approx(0.75)
    width_ms = report["bucket_seconds"] * 1000
    assert all(r["t"] % width_ms == 0 for r in over_time)
    assert [(d["approved"], d["rejected"]) for d in report["approval_decisions"]] == [(1, 0)]
    [decision] = report["response_times"]
    assert decision["approved"] is True and decision["seconds"] == pytest.approx(90, abs=5)

    served = (await client.get("/analytics")).json()
    assert served["report"]["approvals"]["approved"] == 1
    assert {r["task_type"] for r in served["report"]["llm"]} == {"architect", "<script>x</script>"}  # as sent
    page = await client.get("/")
    # The page holds no data at all (its script fetches /analytics), so nothing in it can be markup.
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>x" not in page.text and "architect" not in page.text


async def test_a_decision_is_in_the_report_within_the_archive_check_not_the_interval(sq, central_with):
    """The page said 'decided 0' right after a decision: now an archived message triggers a recompute."""
    _service, client = await central_with(archive_check_interval_seconds=0.1)  # full recompute: hourly
    await eventually(lambda: _computed(client), "the report at start never came")
    assert (await client.get("/analytics")).json()["report"]["approvals"]["decided"] == 0
    traffic = Traffic(sq)
    await traffic.approval(False, 5)
    await traffic.archive_all()

    async def decided() -> bool:
        return (await client.get("/analytics")).json()["report"]["approvals"]["decided"] == 1

    await eventually(decided, "the archived decision never reached the report")
    report = (await client.get("/analytics")).json()["report"]
    assert report["approvals"]["rejected"] == 1 and report["response_times"][0]["approved"] is False


async def _computed(client: httpx.AsyncClient) -> bool:
    return (await client.get("/analytics")).json()["report"] is not None


async def test_only_the_newest_reports_are_kept(sq, central):
    service, client = central
    with psycopg.connect(sq.db_url("centralcloud"), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO analytics_reports (report) SELECT jsonb_build_object('old', n) FROM generate_series(1, %s) n",
            (REPORTS_KEPT + 50,),
        )
    await service.learn()
    with psycopg.connect(sq.db_url("centralcloud")) as conn:
        [(kept,)] = conn.execute("SELECT count(*) FROM analytics_reports").fetchall()
    assert kept == REPORTS_KEPT
    assert "approvals" in (await client.get("/analytics")).json()["report"]  # the newest is the one served


async def _sampled(client: httpx.AsyncClient) -> bool:
    return (await client.get("/analytics")).json()["queues"]["observations"] > 0


async def test_recompute_now_answers_with_the_new_report(sq, central):
    _service, client = central
    await eventually(lambda: _computed(client), "the report at start never came")
    traffic = Traffic(sq)
    await traffic.job("javascript", c.JobStatus.OK)
    await traffic.archive_all()
    answer = await client.post("/analytics/recompute", json={})
    assert answer.status_code == 200
    assert [(r["language"], r["jobs"]) for r in answer.json()["report"]["jobs"]] == [("javascript", 1)]
    assert answer.json()["queues"]["observations"] >= 1  # the queues were sampled too
    refused = await client.post("/analytics/recompute", json={"queue": "x"})
    assert refused.status_code == 422 and refused.json()["error"].startswith("body:")


async def test_the_console_needs_a_login_and_the_api_keeps_its_bearer(sq, central):
    service, _client = central
    browser = httpx.AsyncClient(transport=httpx.ASGITransport(app=service.app()), base_url="http://localhost")
    async with browser:
        page = await browser.get("/", headers={"sec-fetch-mode": "navigate", "accept": "text/html"})
        assert (page.status_code, page.headers["location"]) == (303, "/login")
        assert (await browser.get("/analytics")).status_code == 401
        assert (await browser.get("/static/vendor/chart.umd.min.js")).status_code == 401
        login = await browser.post("/login", data={"token": API_TOKEN}, headers={"origin": "http://localhost"})
        assert (login.status_code, login.headers["location"]) == (303, "/")
        chart_js = await browser.get("/static/vendor/chart.umd.min.js")
        assert chart_js.status_code == 200 and "Chart.js v4.6.1" in chart_js.text[:200]
        assert (await browser.get("/analytics")).json()["settings"]["console_refresh_seconds"] == 15
        # a change relying on the cookie needs our Origin (a browser's fetch sends it)
        assert (await browser.post("/analytics/recompute", json={})).status_code == 403
        ours = await browser.post("/analytics/recompute", json={}, headers={"origin": "http://localhost"})
        assert ours.status_code == 200


async def test_queue_samples_are_kept_for_the_retention_and_dead_letters_counted(sq, central):
    service, client = central
    await eventually(lambda: _sampled(client), "the queues were never sampled at start")
    before = (await client.get("/analytics")).json()["queues"]["observations"]
    traffic = Traffic(sq)
    for _ in range(3):
        await (await traffic.queue("singularity_1")).publish(
            c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language="python")
        )
    traffic.garbage("llm_requests")
    await traffic.archive_all()  # the job requests too: take them back out of the queue afterwards
    for _ in range(3):
        await (await traffic.queue("singularity_1")).publish(
            c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language="python")
        )
    await service.observe_queues()
    await service.observe_queues()
    served = (await client.get("/analytics")).json()
    series = {s["queue"]: s["points"] for s in served["queues"]["series"]}
    assert "job_requests" in series and max(p["length"] for p in series["job_requests"]) == 3
    assert all(not q.endswith("_dlq") for q in series)  # dead-letter queues have their own chart
    assert served["queues"]["observations"] == before + 2
    assert served["dead_letters"] == [
        {"queue": "llm_requests", "dead_letter_queue": "llm_requests_dlq", "waiting": 1, "ever": 1}
    ]
    # Samples older than the retention go at the next observation.
    db = sq.db_url("centralcloud")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE queue_samples SET sampled_at = sampled_at - interval '25 hours'")
    await service.observe_queues()
    with psycopg.connect(db) as conn:
        [(observations,)] = conn.execute("SELECT count(DISTINCT sampled_at) FROM queue_samples").fetchall()
    assert observations == 1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ANALYTICS_INTERVAL_SECONDS", "0"),
        ("ARCHIVE_CHECK_INTERVAL_SECONDS", "0.01"),
        ("CONSOLE_REFRESH_SECONDS", "0.5"),
        ("QUEUE_SAMPLE_RETENTION_HOURS", "0"),
        ("METRICS_INTERVAL_SECONDS", "soon"),
    ],
)
def test_intervals_out_of_range_are_refused_naming_the_variable(monkeypatch, variable, value):
    for name, required in (
        ("DATABASE_URL", "postgresql://cc@localhost/centralcloud"),
        ("SHARED_QUEUE_DB_URL", "postgresql://cc@localhost/shared_queue"),
        ("SHARED_QUEUE_ANALYTICS_URL", "postgresql://cca@localhost/shared_queue"),
        ("CENTRALCLOUD_API_TOKEN", API_TOKEN),
    ):
        monkeypatch.setenv(name, required)
    defaults = CentralCloudSettings()
    assert (defaults.analytics_interval_seconds, defaults.archive_check_interval_seconds) == (60, 2)
    assert (defaults.console_refresh_seconds, defaults.queue_sample_retention_hours) == (15, 24)
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        build_service("centralcloud")
    assert variable in str(refused.value)


async def test_queue_depth_and_age_are_prometheus_metrics(sq, central):
    service, client = central
    singularity = await sq.queue("singularity_1")
    for _ in range(3):
        await singularity.publish(c.JobRequest(reply_to="singularity_1", agent_id="a", code="1", language="python"))
    await service.observe_queues()
    metrics = (await client.get("/metrics")).text
    assert 'singularity_queue_depth{queue="job_requests"} 3.0' in metrics
    assert 'singularity_queue_oldest_message_age_seconds{queue="job_requests"}' in metrics

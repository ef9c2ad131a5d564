"""Singularity's workflow against the real queue, with scripted Nexus and Genesis stand-ins (as their own roles).

The real Nexus and Genesis are exercised end to end in test_stack_e2e.py; here the stand-ins let each
branch of the workflow (reject, question, missing reply, a fix round, a restart) be driven exactly.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import psycopg
import pytest
from yoyo import get_backend, read_migrations

from singularity_stack import contract as c
from singularity_stack.provision.migrations import MIGRATIONS_ROOT, applied_migrations, apply_migrations
from singularity_stack.sharedqueue import Consumer, Delivery, IdempotencyStore
from singularity_stack.sharedqueue.pool import connection_pool
from singularity_stack.singularity import service as service_module
from singularity_stack.singularity.service import SingularityService, SingularitySettings
from singularity_stack.singularity.store import TaskStore
from singularity_stack.singularity.workflow import TaskRun

API_TOKEN = "singularity-test-api-token"
CODE_ANSWER = "Here it is:\n```python\nprint('hello from the stand-in')\n```\n"


class AnswersEveryDelivery(IdempotencyStore):
    """A store that never finds a duplicate: the stand-ins script their answers per delivery."""

    async def claim(self, conn, queue, keys):
        return set(keys)


class StandIns:
    """Consumers that answer Singularity's requests as Nexus and Genesis would, by a script."""

    def __init__(self, stack, *, deduplicate: bool = False) -> None:
        self.stack = stack
        self.deduplicate = deduplicate  # as the real Nexus and Genesis do: a re-sent request_id is a duplicate
        self.llm = lambda r: c.LlmResult(**c.reply_fields(r), result=CODE_ANSWER, model="stand-in", cost_usd=0.001)
        self.job: Callable[[c.JobRequest], c.JobResult] = lambda r: c.JobResult(
            **c.reply_fields(r), status=c.JobStatus.OK, output="hello from the stand-in\n"
        )
        self.approval: Callable[[c.ApprovalRequest], c.ApprovalResponse | None] = lambda r: c.ApprovalResponse(
            **c.reply_fields(r), approved=True, decided_by="alice"
        )
        self.question = lambda r: c.QuestionResponse(
            **c.reply_fields(r), response="print a greeting", answered_by="bob"
        )
        self.seen: dict[str, list[Any]] = {"llm": [], "job": [], "approval": [], "question": []}
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        nexus = await self.stack.queue("nexus")
        genesis = await self.stack.queue("genesis")

        def answering(client, kind: str, script: Callable[[], Callable[[Any], Any]]) -> Callable[..., Awaitable[None]]:
            async def handle(delivery: Delivery[Any]) -> None:
                self.seen[kind].append(delivery.message)
                reply = script()(delivery.message)
                if reply is not None:
                    await client.publish(reply)

            return handle

        # Stand-ins answer every delivery, re-sent ones included, as they did before the Consumer needed a
        # store: a request they leave open on purpose must be answerable when it is re-sent after a restart.
        store = IdempotencyStore if self.deduplicate else AnswersEveryDelivery
        nexus_store = store(await self.stack.db_pool("nexus"))
        genesis_store = store(await self.stack.db_pool("genesis"))
        consumers = [
            Consumer(
                nexus,
                "llm_requests",
                c.LlmRequest,
                answering(nexus, "llm", lambda: self.llm),
                store=nexus_store,
                poll_interval=0.05,
            ),
            Consumer(
                nexus,
                "approval_requests",
                c.ApprovalRequest,
                answering(nexus, "approval", lambda: self.approval),
                store=nexus_store,
                poll_interval=0.05,
            ),
            Consumer(
                nexus,
                "question_requests",
                c.QuestionRequest,
                answering(nexus, "question", lambda: self.question),
                store=nexus_store,
                poll_interval=0.05,
            ),
            Consumer(
                genesis,
                "job_requests",
                c.JobRequest,
                answering(genesis, "job", lambda: self.job),
                store=genesis_store,
                poll_interval=0.05,
            ),
        ]
        self.tasks = [asyncio.create_task(consumer.run(self.stop)) for consumer in consumers]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
def deduplicate() -> bool:
    return False


@pytest.fixture
async def world(sq, deduplicate):
    stand_ins = StandIns(sq, deduplicate=deduplicate)
    await stand_ins.start()
    services: list[SingularityService] = []

    async def start_singularity(**overrides) -> tuple[SingularityService, httpx.AsyncClient]:
        settings = SingularitySettings(
            database_url=sq.db_url("singularity_1"),
            shared_queue_url=sq.url("singularity_1"),
            api_token=API_TOKEN,
            **overrides,
        )
        service = SingularityService(settings)
        await service.start()
        services.append(service)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=service.app()),
            base_url="http://localhost",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )
        return service, client

    yield stand_ins, start_singularity
    for service in services:
        if not service.stop_event.is_set():
            await service.stop()
    await stand_ins.close()


async def wait_for_state(client: httpx.AsyncClient, task_id: str, states=("succeeded", "failed"), timeout=30.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        task = (await client.get(f"/tasks/{task_id}")).json()
        if task["state"] in states:
            return task
        assert asyncio.get_running_loop().time() < deadline, f"task stuck in {task['state']}/{task['phase']}"
        await asyncio.sleep(0.05)


async def submit(client: httpx.AsyncClient, description: str, **extra) -> str:
    response = await client.post("/tasks", json={"description": description, **extra})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def test_a_task_runs_through_every_sparc_phase(world):
    stand_ins, start = world
    _, client = await start()
    task_id = await submit(
        client, "Write a program that prints a friendly greeting", files={"hello.py": "print('hi')\n"}
    )
    task = await wait_for_state(client, task_id)
    assert task["state"] == "succeeded", task["failure_reason"]
    assert [(s["phase"], s["name"], s["kind"]) for s in task["steps"]] == [
        ("specification", "specification", "llm"),
        ("pseudocode", "pseudocode", "llm"),
        ("architecture", "architecture", "llm"),
        ("refinement", "code", "llm"),
        ("refinement", "validate-round-1", "job"),
        ("completion", "review", "llm"),
        ("completion", "approval", "approval"),
    ]
    assert [s["seq"] for s in task["steps"]] == list(range(1, 8))
    assert [r.task_type for r in stand_ins.seen["llm"]] == [
        "planning",
        "pseudocode",
        "architect",
        "code_generation",
        "qa",
    ]
    assert task["cost_usd"] == pytest.approx(0.005)
    assert task["models_used"] == ["stand-in"]
    assert task["result"]["approved_by"] == "alice"
    assert "-print('hi')" in task["result"]["diff"] and "+print('hello from the stand-in')" in task["result"]["diff"]
    assert stand_ins.seen["approval"][0].file_path == "hello.py"
    assert stand_ins.seen["job"][0].code == "print('hello from the stand-in')\n"
    assert {r.reply_to for kind in stand_ins.seen.values() for r in kind} == {"singularity_1"}
    listed = (await client.get("/tasks")).json()
    assert [t["id"] for t in listed] == [task_id]


async def test_a_rejection_fails_the_task_with_the_reviewers_reason(world):
    stand_ins, start = world
    stand_ins.approval = lambda r: c.ApprovalResponse(
        **c.reply_fields(r), approved=False, reason="too risky", decided_by="carol"
    )
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Write a program that deletes temporary files"))
    assert task["state"] == "failed"
    assert task["failure_reason"] == "completion: rejected by carol: too risky"


async def test_an_ambiguous_task_asks_a_question_first(world):
    stand_ins, start = world
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Make it better?"))
    assert task["state"] == "succeeded"
    assert task["steps"][0]["kind"] == "question"
    assert "Could you say more" in stand_ins.seen["question"][0].question
    assert "Clarification from a human: print a greeting" in stand_ins.seen["llm"][0].messages[-1].content


async def test_a_missing_reply_fails_the_step_instead_of_hanging(world):
    stand_ins, start = world
    stand_ins.job = lambda r: None  # Genesis never answers
    _, client = await start(job_timeout_seconds=1.0)
    task = await wait_for_state(client, await submit(client, "Write a program that prints the date"))
    assert task["state"] == "failed"
    assert task["failure_reason"].startswith("refinement: no job reply within 1s")
    assert task["steps"][-1]["state"] == "expired"


async def test_failing_code_gets_a_fix_round(world):
    stand_ins, start = world
    verdicts = iter([c.JobStatus.SYNTAX_ERROR, c.JobStatus.OK])
    stand_ins.job = lambda r: c.JobResult(
        **c.reply_fields(r), status=next(verdicts), error="SyntaxError: invalid syntax", output="ok\n"
    )
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Write a program that prints a haiku"))
    assert task["state"] == "succeeded"
    names = [(s["name"], s["kind"]) for s in task["steps"] if s["phase"] == "refinement"]
    assert names == [("code", "llm"), ("validate-round-1", "job"), ("fix-round-1", "llm"), ("validate-round-2", "job")]
    assert stand_ins.seen["llm"][4].task_type == "coder"
    assert "SyntaxError" in stand_ins.seen["llm"][4].messages[-1].content


def genesis_verdicts(stand_ins: StandIns, *verdicts: c.JobStatus) -> None:
    """Genesis answers the validations with these verdicts, in order."""
    queued = iter(verdicts)
    stand_ins.job = lambda r: c.JobResult(
        **c.reply_fields(r), status=next(queued), error="SyntaxError: invalid syntax", output="ok\n"
    )


async def test_code_that_fails_twice_gets_two_fix_rounds(world):
    stand_ins, start = world
    genesis_verdicts(stand_ins, c.JobStatus.SYNTAX_ERROR, c.JobStatus.RUNTIME_ERROR, c.JobStatus.OK)
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Write a program that prints a haiku"))
    assert task["state"] == "succeeded", task["failure_reason"]
    assert [s["name"] for s in task["steps"] if s["phase"] == "refinement"] == [
        "code",
        "validate-round-1",
        "fix-round-1",
        "validate-round-2",
        "fix-round-2",
        "validate-round-3",
    ]
    fixes = [r for r in stand_ins.seen["llm"] if r.task_type == "coder"]
    assert [f.messages[-1].content.split(":")[0] for f in fixes] == [
        "This python code fails with syntax_error",
        "This python code fails with runtime_error",
    ]


async def test_code_that_still_fails_after_two_fix_rounds_fails_the_task_without_a_third(world):
    stand_ins, start = world
    genesis_verdicts(stand_ins, *[c.JobStatus.SYNTAX_ERROR] * 4)  # a fourth verdict would be a third fix's
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Write a program that prints a haiku"))
    assert task["state"] == "failed"
    assert task["failure_reason"] == (
        "refinement: the code still fails after 2 fix(es): syntax_error: SyntaxError: invalid syntax"
    )
    names = [s["name"] for s in task["steps"]]
    assert names[-5:] == ["validate-round-1", "fix-round-1", "validate-round-2", "fix-round-2", "validate-round-3"]
    assert [r.task_type for r in stand_ins.seen["llm"]].count("coder") == 2
    assert len(stand_ins.seen["job"]) == 3
    assert stand_ins.seen["approval"] == []


@pytest.mark.parametrize(
    ("variable", "description", "silent", "reason"),
    [
        ("LLM_TIMEOUT_SECONDS", "Write a program that prints a haiku", "llm", "specification: no llm reply within 1s"),
        ("JOB_TIMEOUT_SECONDS", "Write a program that prints a haiku", "job", "refinement: no job reply within 1s"),
        ("HUMAN_TIMEOUT_SECONDS", "Write a program that prints a haiku", "approval", "completion: no approval reply"),
        ("HUMAN_TIMEOUT_SECONDS", "Make it better?", "question", "specification: no question reply within 1s"),
    ],
)
async def test_a_reply_that_does_not_come_in_time_fails_the_task(
    world, monkeypatch, variable, description, silent, reason
):
    stand_ins, start = world
    setattr(stand_ins, silent, lambda r: None)  # the model, or the human, never answers
    monkeypatch.setenv(variable, "1")
    _, client = await start()
    task = await wait_for_state(client, await submit(client, description))
    assert task["state"] == "failed"
    assert task["failure_reason"].startswith(reason), task["failure_reason"]
    last = task["steps"][-1]
    assert (last["kind"], last["state"]) == (silent, "expired")
    [request] = stand_ins.seen[silent]
    assert request.deadline is not None  # the receiver knows it too: a late request is dead-lettered as expired
    assert 0 < (request.deadline - request.created_at).total_seconds() <= 1.5


def backdate_steps(stack, agent_id: str, interval: str) -> None:
    """Let time pass for an agent's steps (the limits count them by when they started)."""
    with psycopg.connect(stack.db_url("singularity_1"), autocommit=True) as conn:
        conn.execute(
            f"UPDATE steps SET started_at = started_at - interval '{interval}' "
            "WHERE task_id IN (SELECT id FROM tasks WHERE agent_id = %s)",
            (agent_id,),
        )


async def test_an_agent_over_its_daily_llm_budget_is_refused_further_calls(world, sq, monkeypatch):
    stand_ins, start = world  # every LLM answer costs $0.001
    monkeypatch.setenv("DAILY_LLM_BUDGET_USD", "0.0025")
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Write a program that prints a haiku", agent_id="ann"))
    assert task["state"] == "failed"
    assert task["failure_reason"] == "agent ann spent $0.0030 today; its daily LLM budget is $0.0025"
    assert [(r.agent_id, r.task_type) for r in stand_ins.seen["llm"]] == [
        ("ann", "planning"),
        ("ann", "pseudocode"),
        ("ann", "architect"),
    ]
    # Per agent: another agent has a budget of its own ...
    other = await wait_for_state(client, await submit(client, "Write a program that prints a haiku", agent_id="bo"))
    assert other["failure_reason"] == "agent bo spent $0.0030 today; its daily LLM budget is $0.0025"
    assert [r.agent_id for r in stand_ins.seen["llm"]].count("bo") == 3
    # ... and per day: what ann spent yesterday does not count today.
    backdate_steps(sq, "ann", "25 hours")
    again = await wait_for_state(client, await submit(client, "Write a program that prints a haiku", agent_id="ann"))
    assert again["failure_reason"] == "agent ann spent $0.0030 today; its daily LLM budget is $0.0025"
    assert [r.agent_id for r in stand_ins.seen["llm"]].count("ann") == 6


async def test_an_agent_at_its_requests_per_minute_limit_waits_for_the_minute_to_pass(world, sq, monkeypatch):
    stand_ins, start = world
    monkeypatch.setenv("LLM_REQUESTS_PER_MINUTE", "2")
    service, client = await start()
    usage = service.store.agent_usage
    at_the_limit = 0

    async def counted(agent_id: str):
        nonlocal at_the_limit
        spent, last_minute = await usage(agent_id)
        at_the_limit += last_minute >= 2
        return spent, last_minute

    monkeypatch.setattr(service.store, "agent_usage", counted)
    task_id = await submit(client, "Write a program that prints a haiku", agent_id="cy")
    await until(lambda: at_the_limit >= 3)  # the workflow has found the limit reached three times ...
    assert [r.task_type for r in stand_ins.seen["llm"]] == ["planning", "pseudocode"]  # ... and sent no third
    task = (await client.get(f"/tasks/{task_id}")).json()
    assert (task["state"], [s["name"] for s in task["steps"]]) == ("running", ["specification", "pseudocode"])
    backdate_steps(sq, "cy", "61 seconds")  # the minute passes
    await until(lambda: len(stand_ins.seen["llm"]) >= 3)
    assert stand_ins.seen["llm"][2].task_type == "architect"


def sent(stack, queue: str) -> list[str]:
    """The request_id of every message ever sent to `queue`, in order: still queued, or archived."""
    rows = stack.owner_query(
        f"SELECT message->>'request_id' FROM (SELECT msg_id, message FROM pgmq.q_{queue} "
        f"UNION ALL SELECT msg_id, message FROM pgmq.a_{queue}) m ORDER BY msg_id"
    )
    return [request_id for (request_id,) in rows]


@pytest.mark.parametrize("deduplicate", [True])
async def test_a_restart_mid_task_resumes_without_repeating_steps(world, sq):
    """Each step is sent once; the one still open at the restart is re-sent under its request_id, and the
    receiver (deduplicating as Nexus does) takes the copy for a duplicate: the human still decides once."""
    stand_ins, start = world
    held: list[c.ApprovalRequest] = []
    stand_ins.approval = lambda r: held.append(r)  # the human has not decided yet
    first, client = await start()
    task_id = await submit(client, "Write a program that prints the first ten primes")
    await until(lambda: held)
    await first.stop()  # Singularity goes down while the approval is pending
    llm_before = sent(sq, "llm_requests")
    assert len(llm_before) == len(set(llm_before)) == 5  # every LLM step sent once
    assert sent(sq, "job_requests") == [str(stand_ins.seen["job"][0].request_id)]
    assert sent(sq, "approval_requests") == [str(held[0].request_id)]

    _, client = await start()
    # The restarted workflow replays every answered step from the database and re-sends the open one.
    await until(lambda: len(sent(sq, "approval_requests")) == 2)
    assert sent(sq, "approval_requests") == [str(held[0].request_id)] * 2
    await until(lambda: sq.owner_query("SELECT count(*) FROM pgmq.q_approval_requests") == [(0,)])
    assert len(stand_ins.seen["approval"]) == 1  # the receiver archived the copy as a duplicate
    assert sent(sq, "llm_requests") == llm_before  # nothing asked twice
    assert len(sent(sq, "job_requests")) == 1
    # The reviewer decides (Nexus's HITL publishes the response to the request it holds).
    nexus = await stand_ins.stack.queue("nexus")
    await nexus.publish(c.ApprovalResponse(**c.reply_fields(held[0]), approved=True, decided_by="dave"))
    task = await wait_for_state(client, task_id)
    assert task["state"] == "succeeded"
    assert len(task["steps"]) == 7
    assert task["result"]["approved_by"] == "dave"


@pytest.mark.parametrize("deduplicate", [True])
async def test_a_request_recorded_but_never_sent_is_sent_after_a_restart(world, sq, monkeypatch):
    """The step is recorded before its request is published: an instance that stops in between (here its
    publish fails) leaves a step no receiver ever saw. The restart sends it, under the recorded id."""
    stand_ins, start = world
    first, client = await start()
    publish = first.queue.publish
    lost: list[c.LlmRequest] = []

    async def publish_dies_at_the_architecture(message, **kwargs):
        if isinstance(message, c.LlmRequest) and message.task_type == "architect":
            lost.append(message)
            await asyncio.Event().wait()  # the process is gone before the send
        return await publish(message, **kwargs)

    monkeypatch.setattr(first.queue, "publish", publish_dies_at_the_architecture)
    task_id = await submit(client, "Write a program that prints the first ten primes")
    await until(lambda: lost)
    await first.stop()
    assert str(lost[0].request_id) not in sent(sq, "llm_requests")  # recorded, never sent
    with psycopg.connect(sq.db_url("singularity_1")) as conn:
        architecture = conn.execute(
            "SELECT state, request_id FROM steps WHERE task_id = %s AND name = 'architecture'", (task_id,)
        ).fetchall()
    assert architecture == [("waiting", lost[0].request_id)]

    _, client = await start()
    task = await wait_for_state(client, task_id)
    assert task["state"] == "succeeded", task["failure_reason"]
    llm = sent(sq, "llm_requests")
    assert llm.count(str(lost[0].request_id)) == 1  # sent once, after the restart, under the recorded id
    assert len(llm) == len(set(llm)) == 5
    assert [r.task_type for r in stand_ins.seen["llm"]] == [
        "planning",
        "pseudocode",
        "architect",
        "code_generation",
        "qa",
    ]


def echoing(request: c.LlmRequest) -> c.LlmResult:
    """An LLM whose every answer says which request it answers: a reply replayed into the wrong step shows."""
    answer = f"[{request.task_type}]\n```python\nprint('{request.task_type}')\n```\n"
    return c.LlmResult(**c.reply_fields(request), result=answer, model="stand-in", cost_usd=0.001)


async def until(condition: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


class WithConstraints(TaskRun):
    """A newer version of the workflow: it asks for constraints before the pseudocode, a step that
    tasks started by the older version never had, in front of steps they already have replies for."""

    async def llm(self, phase: str, name: str, task_type: str, prompt: str) -> c.LlmResult:
        if name == "pseudocode":
            constraints = await super().llm("specification", "constraints", "planning", f"Constraints of:\n{prompt}")
            prompt = f"{prompt}\nConstraints:\n{constraints.result}"
        return await super().llm(phase, name, task_type, prompt)


async def test_a_newer_workflow_resumes_a_task_started_by_an_older_one(world, monkeypatch):
    stand_ins, start = world
    stand_ins.llm = echoing
    held: list[c.JobRequest] = []
    answer_jobs = stand_ins.job
    stand_ins.job = lambda r: held.append(r)  # Genesis has not answered yet
    first, client = await start()
    task_id = await submit(client, "Write a program that prints the first ten primes")
    await until(lambda: held)
    await first.stop()  # four LLM steps answered, the job open

    monkeypatch.setattr(service_module, "TaskRun", WithConstraints)  # the upgrade
    stand_ins.job = answer_jobs
    _, client = await start()
    task = await wait_for_state(client, task_id)

    assert task["state"] == "succeeded", task["failure_reason"]
    assert [(s["phase"], s["name"]) for s in task["steps"]] == [
        ("specification", "specification"),
        ("pseudocode", "pseudocode"),
        ("architecture", "architecture"),
        ("refinement", "code"),
        ("refinement", "validate-round-1"),
        ("specification", "constraints"),  # recorded last: steps show in the order they were sent
        ("completion", "review"),
        ("completion", "approval"),
    ]
    # Only the new step and those after the open job were asked; the new one got the specification.
    assert [r.task_type for r in stand_ins.seen["llm"]] == [
        "planning",
        "pseudocode",
        "architect",
        "code_generation",
        "planning",
        "qa",
    ]
    assert stand_ins.seen["llm"][4].messages[-1].content.startswith("Constraints of:\nPseudocode for this")
    assert "[planning]" in stand_ins.seen["llm"][4].messages[-1].content
    assert len({r.request_id for r in stand_ins.seen["job"]}) == 1  # the open job re-sent under its id
    assert task["result"]["code"] == "print('code_generation')\n"  # from the code step's reply
    assert task["result"]["review"].startswith("[qa]")
    replies = {s["name"]: s["reply"]["result"] for s in task["steps"] if s["kind"] == "llm"}
    assert replies["constraints"].startswith("[planning]") and replies["pseudocode"].startswith("[pseudocode]")


class NamesTheDesignLikeThePseudocode(TaskRun):
    """A buggy newer workflow: two steps share a name, so the second would replay the first's reply."""

    async def llm(self, phase: str, name: str, task_type: str, prompt: str) -> c.LlmResult:
        if name == "architecture":
            phase, name = "pseudocode", "pseudocode"
        return await super().llm(phase, name, task_type, prompt)


async def test_a_step_name_used_twice_fails_the_task_instead_of_replaying(world, monkeypatch):
    stand_ins, start = world
    monkeypatch.setattr(service_module, "TaskRun", NamesTheDesignLikeThePseudocode)
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Write a program that prints a friendly greeting"))
    assert task["state"] == "failed"
    assert task["failure_reason"] == "pseudocode: the workflow asks step 'pseudocode' twice"
    assert [r.task_type for r in stand_ins.seen["llm"]] == ["planning", "pseudocode"]


def roll_back_step_names(database_url: str) -> None:
    """Take a database back to before migration 0004, as a task started by the older version left it."""
    backend = get_backend(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        migrations = read_migrations(str(MIGRATIONS_ROOT / "singularity"))
        with backend.lock():
            backend.rollback_migrations(migrations.filter(lambda m: m.id == "0004.step-names"))
    finally:
        backend.connection.close()


async def test_steps_recorded_before_step_names_existed_resume_after_the_migration(world, sq):
    stand_ins, start = world
    stand_ins.llm = echoing
    verdicts = iter([c.JobStatus.SYNTAX_ERROR])
    held: list[c.JobRequest] = []

    def genesis(request: c.JobRequest) -> c.JobResult | None:
        status = next(verdicts, None)
        if status is None:
            held.append(request)  # the second validation stays open
            return None
        return c.JobResult(**c.reply_fields(request), status=status, error="SyntaxError: invalid syntax")

    stand_ins.job = genesis
    first, client = await start()
    task_id = await submit(client, "Make it better?")  # vague: a question first
    await until(lambda: held)
    await first.stop()
    database_url = sq.db_url("singularity_1")
    roll_back_step_names(database_url)  # its steps now have only phase, kind and seq, as before names
    assert "0004.step-names" not in applied_migrations(database_url)
    assert apply_migrations("singularity", database_url) == ["0004.step-names"]  # the upgrade names them

    stand_ins.job = lambda r: c.JobResult(**c.reply_fields(r), status=c.JobStatus.OK, output="ok\n")
    _, client = await start()
    task = await wait_for_state(client, task_id)
    assert task["state"] == "succeeded", task["failure_reason"]
    assert [s["name"] for s in task["steps"]] == [
        "clarify",
        "specification",
        "pseudocode",
        "architecture",
        "code",
        "validate-round-1",
        "fix-round-1",
        "validate-round-2",
        "review",
        "approval",
    ]
    assert len(stand_ins.seen["question"]) == 1
    assert [r.task_type for r in stand_ins.seen["llm"]] == [
        "planning",
        "pseudocode",
        "architect",
        "code_generation",
        "coder",
        "qa",
    ]  # nothing asked twice
    assert len({r.request_id for r in stand_ins.seen["job"]}) == 2
    assert task["result"]["code"] == "print('coder')\n"  # the fix's code, replayed from its step


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"files": {}}, 422, "description: Field required"),
        ({"description": "x", "language": "cobol"}, 422, "language: Input should be"),
        ({"description": "x", "surprise": 1}, 422, "surprise: Extra inputs are not permitted"),
    ],
)
async def test_bad_requests_get_a_4xx_with_the_reason(world, body, status, reason):
    _, start = world
    _, client = await start()
    response = await client.post("/tasks", json=body)
    assert response.status_code == status
    assert reason in response.json()["error"]


async def test_unknown_or_malformed_task_ids_are_404(world):
    _, start = world
    _, client = await start()
    assert (await client.get(f"/tasks/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/tasks/not-a-uuid")).status_code == 404
    bad_json = await client.post("/tasks", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400


async def test_health_readiness_and_metrics(world):
    _, start = world
    service, client = await start()
    assert (await client.get("/healthz")).json() == {"status": "alive", "service": "singularity"}
    for _ in range(100):  # the NOTIFY listener connects in the background
        ready = await client.get("/readyz")
        if ready.status_code == 200:
            break
        await asyncio.sleep(0.05)
    assert ready.json()["status"] == "ready"
    await wait_for_state(client, await submit(client, "Write a program that prints a friendly greeting"))
    metrics = (await client.get("/metrics")).text
    assert 'singularity_queue_messages_total{outcome="handled",queue="llm_results_singularity_1"}' in metrics
    await service.db.close()  # its database goes away: no longer ready, and says why
    not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503
    assert "database" in not_ready.json()["problems"]


async def test_a_reply_whose_wake_up_was_lost_is_found_in_the_database(world, monkeypatch):
    """The reply consumer wakes the workflow after its commit; a process can lose that wake-up (the commit's
    answer never came back, so the redelivery was a duplicate). The stored reply is found all the same."""
    from singularity_stack.singularity import workflow

    monkeypatch.setattr(workflow, "REPLY_RECHECK_SECONDS", 0.2)
    _, start = world
    service, client = await start()
    monkeypatch.setattr(service.waiter, "resolve", lambda reply: None)  # every wake-up lost
    task_id = await submit(client, "Write a program that prints a friendly greeting")
    task = await wait_for_state(client, task_id, timeout=60)
    assert task["state"] == "succeeded", task["failure_reason"]
    assert len(task["steps"]) == 7  # every reply came from the database


async def test_requests_answered_at_no_cost_do_not_count_against_the_per_minute_limit(world, monkeypatch):
    """The limit guards money: with the free offline stand-in a task is not slowed by it."""
    stand_ins, start = world
    stand_ins.llm = lambda r: c.LlmResult(**c.reply_fields(r), result=CODE_ANSWER, model="offline", cost_usd=0)
    monkeypatch.setenv("LLM_REQUESTS_PER_MINUTE", "1")
    _, client = await start()
    task = await wait_for_state(client, await submit(client, "Write a program that prints a haiku", agent_id="di"))
    assert task["state"] == "succeeded", task
    assert len(stand_ins.seen["llm"]) == 5  # every LLM step of the task within the minute, none waited out


async def test_the_daily_budget_counts_from_midnight_utc_whatever_the_session_time_zone(sq):
    """agent_usage's day is the UTC day, also on a connection whose TimeZone is far from UTC (UTC+14, whose
    midnight is 10:00 UTC the day before): yesterday's spending (UTC) never counts, today's always does."""
    with psycopg.connect(sq.db_url("singularity_1"), autocommit=True) as conn:
        conn.execute("INSERT INTO agents (id) VALUES ('tz-agent')")
        task = uuid.uuid4()
        conn.execute(
            "INSERT INTO tasks (id, agent_id, description, language) VALUES (%s, 'tz-agent', 'x', 'python')", (task,)
        )
        today = "date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
        for seq, (offset, cost) in enumerate((("- interval '1 minute'", 1), ("+ interval '1 minute'", 2))):
            conn.execute(
                "INSERT INTO steps (task_id, seq, phase, name, kind, request_id, state, request, cost_usd, deadline, "
                f"started_at) VALUES (%s, %s, 'p', %s, 'llm', %s, 'done', '{{}}', %s, now(), {today} {offset})",
                (task, seq, f"step-{seq}", uuid.uuid4(), cost),
            )
    url = sq.db_url("singularity_1")
    pool = connection_pool(url + ("&" if "?" in url else "?") + "options=-c%20TimeZone%3DPacific/Kiritimati")
    await pool.open()
    try:
        async with pool.connection() as conn:
            assert (await (await conn.execute("SHOW TimeZone")).fetchone()) == ("Pacific/Kiritimati",)
        spent, _ = await TaskStore(pool).agent_usage("tz-agent")
    finally:
        await pool.close()
    assert spent == 2  # the step a minute after midnight UTC; not the one a minute before

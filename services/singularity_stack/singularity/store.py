"""Singularity's private database: agents, tasks, steps, decisions and cost. SQL lives here only."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from singularity_stack import contract as c


@dataclass(frozen=True)
class Step:
    task_id: uuid.UUID
    seq: int  # the order steps were recorded in, for display; replay finds a step by (phase, name)
    phase: str
    name: str
    kind: str
    request_id: uuid.UUID
    state: str
    request: dict[str, Any]
    reply: dict[str, Any] | None
    error: str | None
    deadline: datetime


class TaskStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    # -- tasks -----------------------------------------------------------------------------------

    async def create_task(
        self, task_id: uuid.UUID, agent_id: str, description: str, language: str, files: dict[str, str]
    ) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("INSERT INTO agents (id) VALUES (%s) ON CONFLICT DO NOTHING", (agent_id,))
            await conn.execute(
                "INSERT INTO tasks (id, agent_id, description, language, files) VALUES (%s, %s, %s, %s, %s)",
                (task_id, agent_id, description, language, Jsonb(files)),
            )

    async def task(self, task_id: uuid.UUID) -> dict[str, Any] | None:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute("SELECT * FROM tasks WHERE id = %s", (task_id,))
            return await cur.fetchone()

    async def tasks(self, limit: int = 100) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "SELECT id, agent_id, description, state, phase, cost_usd, failure_reason, created_at, updated_at "
                "FROM tasks ORDER BY created_at DESC LIMIT %s",
                (limit,),
            )
            return await cur.fetchall()

    async def unfinished_tasks(self) -> list[uuid.UUID]:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT id FROM tasks WHERE state IN ('pending', 'running') ORDER BY created_at")
            return [row[0] for row in await cur.fetchall()]

    async def set_phase(self, task_id: uuid.UUID, phase: str) -> None:
        await self._execute(
            "UPDATE tasks SET state = 'running', phase = %s, updated_at = now() WHERE id = %s", (phase, task_id)
        )

    async def finish(self, task_id: uuid.UUID, result: dict[str, Any]) -> None:
        await self._execute(
            "UPDATE tasks SET state = 'succeeded', result = %s, updated_at = now() WHERE id = %s",
            (Jsonb(result), task_id),
        )

    async def fail(self, task_id: uuid.UUID, reason: str) -> None:
        await self._execute(
            "UPDATE tasks SET state = 'failed', failure_reason = %s, updated_at = now() WHERE id = %s",
            (reason, task_id),
        )

    # -- steps -----------------------------------------------------------------------------------

    async def step(self, task_id: uuid.UUID, phase: str, name: str) -> Step | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT task_id, seq, phase, name, kind, request_id, state, request, reply, error, deadline "
                "FROM steps WHERE task_id = %s AND phase = %s AND name = %s",
                (task_id, phase, name),
            )
            row = await cur.fetchone()
            return Step(*row) if row else None

    async def steps(self, task_id: uuid.UUID) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "SELECT seq, phase, name, kind, request_id, state, model, cost_usd, error, started_at, finished_at, "
                # The database's clock, so a browser's own clock cannot make a wait look negative.
                "extract(epoch FROM coalesce(finished_at, clock_timestamp()) - started_at)::float8 AS waited_seconds, "
                "request, reply FROM steps WHERE task_id = %s ORDER BY seq",
                (task_id,),
            )
            return await cur.fetchall()

    async def task_of_request(self, request_id: uuid.UUID) -> uuid.UUID | None:
        """The task whose step sent `request_id` (a reviewer's card names the request, not the task)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT task_id FROM steps WHERE request_id = %s", (request_id,))
            row = await cur.fetchone()
            return row[0] if row else None

    async def add_step(self, task_id: uuid.UUID, phase: str, name: str, kind: str, request: c.Request) -> None:
        """Record a step after the task's last one (one workflow runs a task at a time)."""
        await self._execute(
            "INSERT INTO steps (task_id, seq, phase, name, kind, request_id, request, deadline) "
            "VALUES (%s, (SELECT coalesce(max(seq), 0) + 1 FROM steps WHERE task_id = %s), %s, %s, %s, %s, %s, %s)",
            (
                task_id,
                task_id,
                phase,
                name,
                kind,
                request.request_id,
                Jsonb(json.loads(request.model_dump_json())),
                request.deadline,
            ),
        )

    async def fail_step(self, request_id: uuid.UUID, state: str, error: str) -> None:
        await self._execute(
            "UPDATE steps SET state = %s, error = %s, finished_at = now() WHERE request_id = %s AND state = 'waiting'",
            (state, error, request_id),
        )

    async def record_reply(self, db: psycopg.AsyncConnection[TupleRow], reply: c.Reply) -> str | None:
        """Store a reply on its step in the consumer's transaction; returns the step's kind, or None when no
        step waits for it (it came after the step's deadline, or belongs to no task of this instance)."""
        cost = reply.cost_usd if isinstance(reply, c.LlmResult) else 0
        model = reply.model if isinstance(reply, c.LlmResult) else None
        error = reply.error if isinstance(reply, c.LlmResult) else None
        failed = error is not None
        cur = await db.execute(
            "UPDATE steps SET state = %s, reply = %s, model = %s, cost_usd = %s, error = %s, finished_at = now() "
            "WHERE request_id = %s AND state = 'waiting' RETURNING task_id, kind",
            (
                "failed" if failed else "done",
                Jsonb(json.loads(reply.model_dump_json())),
                model,
                cost,
                error,
                reply.request_id,
            ),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        task_id, kind = row
        if kind == "llm":
            await db.execute("UPDATE tasks SET cost_usd = cost_usd + %s WHERE id = %s", (cost, task_id))
            await db.execute(
                "UPDATE agents SET llm_calls = llm_calls + 1, llm_cost_usd = llm_cost_usd + %s "
                "WHERE id = (SELECT agent_id FROM tasks WHERE id = %s)",
                (cost, task_id),
            )
        elif isinstance(reply, c.ApprovalResponse):
            await db.execute(
                "INSERT INTO decisions (request_id, task_id, kind, approved, reason, decided_by) "
                "VALUES (%s, %s, 'approval', %s, %s, %s)",
                (reply.request_id, task_id, reply.approved, reply.reason, reply.decided_by),
            )
        elif isinstance(reply, c.QuestionResponse):
            await db.execute(
                "INSERT INTO decisions (request_id, task_id, kind, response, decided_by) "
                "VALUES (%s, %s, 'answer', %s, %s)",
                (reply.request_id, task_id, reply.response, reply.answered_by),
            )
        return str(kind)

    # -- limits ----------------------------------------------------------------------------------

    async def agent_usage(self, agent_id: str) -> tuple[float, int]:
        """(LLM cost since midnight UTC, paid LLM requests in the last minute) for one agent.

        The per-minute limit guards money: a request answered at no cost (the offline model) does not count;
        one not answered yet, failed or expired does, since what it costs is not known."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT coalesce(sum(s.cost_usd) FILTER (WHERE s.started_at >= "
                "date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'), 0), "
                "count(*) FILTER (WHERE s.started_at >= now() - interval '1 minute' "
                "AND (s.state <> 'done' OR s.cost_usd > 0)) "
                "FROM steps s JOIN tasks t ON t.id = s.task_id "
                "WHERE s.kind = 'llm' AND t.agent_id = %s AND s.started_at >= now() - interval '1 day'",
                (agent_id,),
            )
            row = await cur.fetchone()
            assert row is not None
            return float(row[0]), int(row[1])

    async def _execute(self, query: str, params: tuple[Any, ...]) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(query, params)

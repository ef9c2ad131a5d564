"""Genesis's own database: one row per job it answered (`executions`), never the job's code or output."""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from singularity_stack.contract import JobRequest, JobResult


async def record_execution(db: psycopg.AsyncConnection[TupleRow], request: JobRequest, result: JobResult) -> None:
    """In the consumer's transaction, keyed by the instance that asked (the reply's recipient)."""
    await db.execute(
        "INSERT INTO executions (request_id, instance, agent_id, language, status, exit_code, lint_count, "
        "timings_ms, stdout_bytes, stderr_bytes) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            request.request_id,
            result.recipient,
            request.agent_id,
            request.language.value,
            result.status.value,
            result.exit_code,
            len(result.lint),
            Jsonb(result.timings_ms),
            len(result.output.encode()),
            len((result.error or "").encode()),
        ),
    )

"""Nexus's own database, for the LLM router: the history of every call it made (`llm_calls`).

The human-in-the-loop tables have their store in hitl.py.
"""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

from singularity_stack.contract import LlmRequest, LlmResult
from singularity_stack.nexus.completion import Completion


async def record_llm_call(
    db: psycopg.AsyncConnection[TupleRow],
    request: LlmRequest,
    instance: str | None,
    completion: Completion | None,
    result: LlmResult,
) -> None:
    """One row per answered request, in the consumer's transaction; `completion` is None when routing failed."""
    await db.execute(
        "INSERT INTO llm_calls (request_id, instance, agent_id, task_type, complexity, complexity_source, model, "
        "provider_model, cost_usd, prompt_tokens, completion_tokens, latency_ms, error) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            request.request_id,
            instance,
            request.agent_id,
            request.task_type,
            completion.complexity.value if completion else (request.complexity or None),
            completion.complexity_source if completion else None,
            result.model,
            completion.provider_model if completion else None,
            result.cost_usd,
            result.prompt_tokens,
            result.completion_tokens,
            completion.latency_ms if completion else None,
            result.error,
        ),
    )

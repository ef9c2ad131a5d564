"""Cutover (phase 2 of the migration from NATS): a NATS request is no longer served, but refused aloud.

A NATS-only publisher that was missed would otherwise wait for its deadline. Instead the service that
owns the request kind answers on the publisher's NATS reply subject (ReplyRouter, as any NATS reply)
with an error saying where to publish now, and the request is dead-lettered in pgmq as `permanent` with
the same words, so the DLQ and `singularity_nats_messages_total{outcome="dead"}` show who still uses NATS.
The contract has no error field in approval and question responses: a refusal is a rejection there, and a
question's response that says it was refused.
"""

from __future__ import annotations

from typing import Any

from singularity_stack import contract as c
from singularity_stack.sharedqueue.consumer import Delivery
from singularity_stack.sharedqueue.errors import Permanent
from singularity_stack.sharedqueue.nats_replies import ReplyRouter

REFUSAL = "cutover: this stack no longer serves requests sent on NATS; publish them on the shared queue (pgmq)"
REFUSED_BY = "nats-cutover"


def refusal(request: c.Request) -> c.Reply:
    """The error reply to a NATS request of any kind, for its vouched sender."""
    fields = c.reply_fields(request)
    if isinstance(request, c.LlmRequest):
        return c.LlmResult(**fields, error=REFUSAL)
    if isinstance(request, c.JobRequest):
        return c.JobResult(**fields, status=c.JobStatus.ERROR, error=REFUSAL)
    if isinstance(request, c.ApprovalRequest):
        return c.ApprovalResponse(**fields, approved=False, reason=REFUSAL, decided_by=REFUSED_BY)
    if isinstance(request, c.QuestionRequest):
        return c.QuestionResponse(**fields, response=REFUSAL, answered_by=REFUSED_BY)
    raise TypeError(f"no refusal for {type(request).__name__}")


def refuser(replies: ReplyRouter) -> Any:
    """A NatsReader handler that refuses every request (the reader has checked its sender is reply_to)."""

    async def refuse(delivery: Delivery[Any]) -> None:
        await replies.send(delivery, refusal(delivery.message))
        raise Permanent(REFUSAL)  # rolls the claim back: the request is dead-lettered, never handled

    return refuse

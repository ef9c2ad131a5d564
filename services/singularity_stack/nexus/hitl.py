"""Human in the loop: the approval and question requests Nexus holds until a reviewer decides.

Requests arrive from the shared queue and are stored in Nexus's database (`hitl_requests`) inside
the consumer's idempotency transaction. A reviewer's decision is one transaction on that database:
the state moves off `pending` (only once: a second reviewer gets a Conflict), an append-only audit
row is written, and the reply is published to the requesting instance's reply queue *before* the
commit. If publishing fails nothing is recorded and the reviewer can retry; if the commit fails
after a publish, the retry publishes a duplicate, which Singularity drops by `request_id`.

Every open browser learns about new and settled requests through the `Broadcaster`, always after
the change is committed, so a browser never shows a card that could still disappear by rollback.
With several Nexus replicas each change also goes to the others through PostgreSQL (hitl_feed.py): every
browser sees every change, whichever replica it is connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg.rows import TupleRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from singularity_stack.contract import ApprovalRequest, ApprovalResponse, QuestionRequest, QuestionResponse, Reply
from singularity_stack.nexus.hitl_feed import HitlFeed, new_origin, notify
from singularity_stack.sharedqueue import Permanent, SharedQueue
from singularity_stack.sharedqueue.consumer import AfterCommit
from singularity_stack.sharedqueue.nats_replies import ReplyRouter

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from singularity_stack.nexus.reviewers import Reviewers

log = logging.getLogger(__name__)
R = TypeVar("R", bound=Reply)

Event = dict[str, Any]
Card = dict[str, Any]
# Sent to a subscriber that fell too far behind, in place of its backlog: it gets a fresh snapshot.
RESYNC: Event = {"type": "resync"}


# -- errors the web layer maps to HTTP statuses ------------------------------------------------------


class HitlError(Exception):
    status_code = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotFound(HitlError):
    status_code = 404


class Conflict(HitlError):
    """Already decided, expired, or an approval answered as a question (or the reverse)."""

    status_code = 409


class InvalidDecision(HitlError):
    """A decision that can never be accepted as given, e.g. a rejection without a reason."""

    status_code = 422


class RequestIdTaken(Permanent):
    """An arriving request reuses the id of one held for another instance: it can never be held, so the
    consumer dead-letters it at once with this reason (not a web error)."""


# -- fan-out to browsers ----------------------------------------------------------------------------


class Broadcaster:
    """In-process fan-out of events to every connected browser.

    Each subscriber has its own bounded inbox, so one slow browser never delays the others; when
    its inbox overflows its backlog is replaced by RESYNC and it is sent a fresh snapshot instead.
    """

    def __init__(self, backlog: int = 256) -> None:
        self.backlog = backlog
        self._inboxes: set[asyncio.Queue[Event]] = set()

    def __len__(self) -> int:
        return len(self._inboxes)

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[asyncio.Queue[Event]]:
        inbox: asyncio.Queue[Event] = asyncio.Queue(self.backlog)
        self._inboxes.add(inbox)
        try:
            yield inbox
        finally:
            self._inboxes.discard(inbox)

    def publish(self, event: Event) -> None:
        for inbox in self._inboxes:
            try:
                inbox.put_nowait(event)
            except asyncio.QueueFull:
                while not inbox.empty():
                    inbox.get_nowait()
                inbox.put_nowait(RESYNC)


# -- storage ----------------------------------------------------------------------------------------

_CARD_COLUMNS = (
    "request_id, kind, instance, agent_id, payload, received_at, deadline, "
    "extract(epoch FROM clock_timestamp() - received_at)::float8 AS age_seconds"
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def card(row: dict[str, Any]) -> Card:
    """A stored request as the browser shows it; every value is JSON-ready."""
    payload: dict[str, Any] = row["payload"]
    result: Card = {
        "request_id": str(row["request_id"]),
        "kind": row["kind"],
        "agent_id": row["agent_id"],
        "instance": row["instance"],
        "received_at": _iso(row["received_at"]),
        "deadline": _iso(row["deadline"]),
        "age_seconds": round(max(float(row["age_seconds"]), 0.0), 1),
    }
    if row["kind"] == "approval":
        result |= {
            "file_path": payload.get("file_path", ""),
            "description": payload.get("description", ""),
            "diff": payload.get("diff", ""),
        }
        if payload.get("answered"):  # the questions the task asked a human before this change, and the answers
            result["answered"] = payload["answered"]
    else:
        result |= {"question": payload.get("question", ""), "context": payload.get("context", "")}
    return result


def _kind(request: ApprovalRequest | QuestionRequest) -> str:
    return "approval" if isinstance(request, ApprovalRequest) else "question"


class HitlStore:
    """All HITL SQL. Methods taking `conn` run inside the caller's transaction."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def insert(
        self,
        conn: psycopg.AsyncConnection[TupleRow],
        request: ApprovalRequest | QuestionRequest,
        instance: str,
        path: str = "pgmq",
    ) -> dict[str, Any] | None:
        """Store a new pending request from `instance`, come by `path`, and its 'received' audit row; None if
        it was stored before."""
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "INSERT INTO hitl_requests (request_id, kind, instance, agent_id, payload, deadline, reply_path) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (request_id) DO NOTHING "
            f"RETURNING {_CARD_COLUMNS}",
            (
                request.request_id,
                _kind(request),
                instance,
                request.agent_id,
                Jsonb(request.model_dump(mode="json")),
                request.deadline,
                path,
            ),
        )
        row = await cur.fetchone()
        if row is not None:
            await self.audit(conn, request.request_id, "received", "system", {"queue": request.queue})
            return row
        lookup = await conn.execute("SELECT instance FROM hitl_requests WHERE request_id = %s", (request.request_id,))
        held = await lookup.fetchone()
        if held is not None and held[0] != instance:
            # Reviewers address requests by id alone: another instance's request under this id must
            # neither be dropped as a duplicate nor share its answer. It fails, and is dead-lettered.
            raise RequestIdTaken(f"request id {request.request_id} is already held for {held[0]}, not {instance}")
        return None

    async def pending_one(self, request_id: uuid.UUID) -> dict[str, Any] | None:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {_CARD_COLUMNS} FROM hitl_requests WHERE request_id = %s AND state = 'pending'", (request_id,)
            )
            return await cur.fetchone()

    async def settled(self, request_id: uuid.UUID) -> tuple[str, str] | None:
        """(state, decided by) of a request no longer pending; None while it is pending or unknown."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT state, decided_by FROM hitl_requests WHERE request_id = %s AND state <> 'pending'",
                (request_id,),
            )
            row = await cur.fetchone()
            return (str(row[0]), str(row[1])) if row else None

    async def pending(self) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {_CARD_COLUMNS} FROM hitl_requests WHERE state = 'pending' ORDER BY received_at, request_id"
            )
            return await cur.fetchall()

    async def settle(
        self,
        conn: psycopg.AsyncConnection[TupleRow],
        request_id: uuid.UUID,
        kind: str,
        state: str,
        actor: str,
        decision: dict[str, Any],
    ) -> tuple[str, str] | None:
        """Move a pending, not overdue request of `kind` to `state`; returns its instance and the path it
        came by (where the answer goes), or None.

        A concurrent decision on the same row waits for the row lock, then finds it no longer
        pending: exactly one reviewer wins.
        """
        cur = await conn.execute(
            "UPDATE hitl_requests SET state = %s, decided_at = now(), decided_by = %s, decision = %s "
            "WHERE request_id = %s AND kind = %s AND state = 'pending' AND (deadline IS NULL OR deadline > now()) "
            "RETURNING instance, reply_path",
            (state, actor, Jsonb(decision), request_id, kind),
        )
        row = await cur.fetchone()
        return (str(row[0]), str(row[1])) if row else None

    async def refusal(self, conn: psycopg.AsyncConnection[TupleRow], request_id: uuid.UUID, kind: str) -> HitlError:
        """Why `settle` found nothing to decide, as the error to raise."""
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(
            "SELECT kind, state, decided_by, decided_at, deadline FROM hitl_requests WHERE request_id = %s",
            (request_id,),
        )
        row = await cur.fetchone()
        if row is None:
            return NotFound(f"unknown request {request_id}")
        if row["kind"] != kind:
            return Conflict(f"request {request_id} is {_article(row['kind'])}, not {_article(kind)}")
        if row["state"] == "pending":
            return Conflict(f"request {request_id} expired at {_iso(row['deadline'])}")
        if row["state"] == "expired":
            return Conflict(f"already decided (expired at {_iso(row['decided_at'])})")
        return Conflict(f"already decided ({row['state']} by {row['decided_by']})")

    async def audit(
        self,
        conn: psycopg.AsyncConnection[TupleRow],
        request_id: uuid.UUID,
        action: str,
        actor: str,
        detail: dict[str, Any],
    ) -> None:
        await conn.execute(
            "INSERT INTO hitl_audit (request_id, action, actor, detail) VALUES (%s, %s, %s, %s)",
            (request_id, action, actor, Jsonb(detail)),
        )

    async def pending_on_nats(self) -> int:
        """Pending requests that came by NATS: their answers still go out on NATS (the migration's phase 3
        waits for none to be left)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM hitl_requests WHERE state = 'pending' AND reply_path = 'nats'"
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def expire_overdue(self, origin: str) -> list[uuid.UUID]:
        """Expire every pending request past its deadline, with its audit row and its notification to the
        other replicas, in one transaction."""
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "WITH expired AS ("
                "  UPDATE hitl_requests SET state = 'expired', decided_at = now(), decided_by = 'system'"
                "  WHERE state = 'pending' AND deadline <= now() RETURNING request_id, deadline"
                ") INSERT INTO hitl_audit (request_id, action, actor, detail) "
                "SELECT request_id, 'expired', 'system', jsonb_build_object('deadline', deadline) FROM expired "
                "RETURNING request_id"
            )
            expired = [row[0] for row in await cur.fetchall()]
            for request_id in expired:
                await notify(conn, origin, _removed(request_id, "expired", "system"))
            return expired


def _removed(request_id: uuid.UUID, state: str, by: str) -> Event:
    return {"type": "removed", "request_id": str(request_id), "state": state, "by": by}


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


# -- logic ------------------------------------------------------------------------------------------


class Hitl:
    def __init__(self, pool: AsyncConnectionPool, queue: SharedQueue, replies: ReplyRouter | None = None) -> None:
        self.store = HitlStore(pool)
        self.queue = queue
        # Answers go back the way their request came (a request held in dual operation may have come on NATS).
        self.replies = replies or ReplyRouter(queue, None)
        self.broadcaster = Broadcaster()
        self.origin = new_origin()  # this replica, in the notifications it sends the others

    def feed(self, database_url: str) -> HitlFeed:
        """The other replicas' changes, for this replica's browsers (run it as a job of the service)."""
        return HitlFeed(database_url, self.origin, self.remote_change, lambda: self.broadcaster.publish(RESYNC))

    async def remote_change(self, event: Event) -> None:
        """Another replica committed a change: show it here too. A card is read from the database (gone
        already if it was settled meanwhile: the removal follows)."""
        if event.get("type") == "added":
            row = await self.store.pending_one(uuid.UUID(event["request_id"]))
            if row is not None:
                self.broadcaster.publish({"type": "added", "card": card(row)})
        elif event.get("type") == "removed":
            # What the database says, not the payload: a card is cleared only once it is no longer pending.
            request_id = uuid.UUID(event["request_id"])
            settled = await self.store.settled(request_id)
            if settled is not None:
                self.broadcaster.publish(_removed(request_id, *settled))

    # -- arrivals ----------------------------------------------------------------------------------

    async def receive(
        self,
        db: psycopg.AsyncConnection[TupleRow],
        request: ApprovalRequest | QuestionRequest,
        sender: str,
        after_commit: Callable[[AfterCommit], None],
        path: str = "pgmq",
    ) -> None:
        """Store a request from `sender` (the instance PostgreSQL or nats-server vouches sent it, which gets
        the answer) come by `path` inside the consumer's open transaction `db`; browsers see it once that
        commits (`after_commit` is the consumer's Delivery.after_commit)."""
        row = await self.store.insert(db, request, sender, path)
        if row is None:
            return  # stored before (a redelivery that slipped past the idempotency table): nothing new to show
        await notify(db, self.origin, {"type": "added", "request_id": str(request.request_id)})
        new = card(row)
        # Never before the commit: a browser must not show a card that a rollback takes back. If Nexus
        # dies first, browsers still get it from the database when they (re)connect.
        after_commit(lambda: self.broadcaster.publish({"type": "added", "card": new}))

    # -- reading -----------------------------------------------------------------------------------

    async def pending(self) -> list[Card]:
        """Every pending request, oldest first."""
        return [card(row) for row in await self.store.pending()]

    async def snapshot(self) -> dict[str, list[Card]]:
        cards = await self.pending()
        return {
            "approvals": [c for c in cards if c["kind"] == "approval"],
            "questions": [c for c in cards if c["kind"] == "question"],
        }

    # -- decisions ---------------------------------------------------------------------------------

    @staticmethod
    def _actor(actor: str) -> str:
        """`actor` is the authenticated identity (hitl_web), never a name the client typed."""
        if not actor.strip():
            raise ValueError("a decision needs the authenticated reviewer")
        return actor.strip()

    async def decide(self, request_id: uuid.UUID, approved: bool, reason: str, actor: str) -> ApprovalResponse:
        reason, actor = reason.strip(), self._actor(actor)
        if not approved and not reason:
            raise InvalidDecision("reason: a rejection needs a reason")
        state = "approved" if approved else "rejected"

        def reply(instance: str) -> ApprovalResponse:
            return ApprovalResponse(
                request_id=request_id, recipient=instance, approved=approved, reason=reason, decided_by=actor
            )

        return await self._settle(request_id, "approval", state, actor, {"approved": approved, "reason": reason}, reply)

    async def answer(self, request_id: uuid.UUID, response: str, actor: str) -> QuestionResponse:
        if not response.strip():
            raise InvalidDecision("response: the answer must not be blank")
        actor = self._actor(actor)

        def reply(instance: str) -> QuestionResponse:
            return QuestionResponse(request_id=request_id, recipient=instance, response=response, answered_by=actor)

        return await self._settle(request_id, "question", "answered", actor, {"response": response}, reply)

    async def _settle(
        self,
        request_id: uuid.UUID,
        kind: str,
        state: str,
        actor: str,
        decision: dict[str, Any],
        reply: Callable[[str], R],
    ) -> R:
        """One transaction: claim the pending row, audit, publish the reply; then tell the browsers."""
        async with self.store.pool.connection() as conn, conn.transaction():
            settled = await self.store.settle(conn, request_id, kind, state, actor, decision)
            if settled is None:
                raise await self.store.refusal(conn, request_id, kind)
            instance, path = settled
            message = reply(instance)
            await self.store.audit(conn, request_id, state, actor, decision)
            await notify(conn, self.origin, _removed(request_id, state, actor))
            # Published before the commit: a failure here rolls the decision back so it can be retried.
            await self.replies.send_by(path, message)
        self.broadcaster.publish(_removed(request_id, state, actor))
        log.info("HITL request %s %s by %s", request_id, state, actor)
        return message

    async def expire_overdue(self) -> int:
        """Expire pending requests past their deadline; returns how many."""
        expired = await self.store.expire_overdue(self.origin)
        for request_id in expired:
            self.broadcaster.publish(_removed(request_id, "expired", "system"))
        if expired:
            log.info("expired %d HITL requests", len(expired))
        return len(expired)

    # -- web ---------------------------------------------------------------------------------------

    def routes(
        self, token: str, reviewers: Reviewers | None = None, console_urls: Mapping[str, str] | None = None
    ) -> list[BaseRoute]:
        """The reviewer UI and its API, for the named `reviewers` and the shared `token` (see hitl_web);
        `console_urls` (instance → its console's base URL) link each card to the task that sent it."""
        # Imported here: hitl_web builds on this module's classes.
        from singularity_stack.nexus.hitl_web import hitl_routes
        from singularity_stack.nexus.reviewers import Reviewers

        return hitl_routes(self, token, reviewers if reviewers is not None else Reviewers(None), console_urls or {})

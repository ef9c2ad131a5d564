"""Replies awaited by request_id: the reply consumers resolve what the workflows wait for."""

from __future__ import annotations

import asyncio
import uuid

from singularity_stack.contract import Reply


class ReplyWaiter:
    def __init__(self) -> None:
        self._futures: dict[uuid.UUID, asyncio.Future[Reply]] = {}

    def expect(self, request_id: uuid.UUID) -> asyncio.Future[Reply]:
        """Register interest before publishing, so a fast reply cannot slip by."""
        future = self._futures.get(request_id)
        if future is None or future.done():
            future = asyncio.get_running_loop().create_future()
            self._futures[request_id] = future
        return future

    def resolve(self, reply: Reply) -> None:
        future = self._futures.pop(reply.request_id, None)
        if future is not None and not future.done():
            future.set_result(reply)

    def forget(self, request_id: uuid.UUID) -> None:
        future = self._futures.pop(request_id, None)
        if future is not None and not future.done():
            future.cancel()

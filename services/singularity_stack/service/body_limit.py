"""An ASGI middleware that caps request bodies while they stream, before any handler parses them.

A declared Content-Length above the limit is refused before a byte of the body is read; a chunked
(or lying) body is counted as it arrives and refused as soon as the count passes the limit, so a
stranger's 300 MiB upload costs at most `limit` bytes of memory. Bodies within the limit are
handed to the app unchanged.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from singularity_stack.service.http import error_response

DEFAULT_MAX_BODY_BYTES = 1 << 20


class BodyTooLarge(Exception):
    """The body passed the limit while it was read."""


async def read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """(the whole body, whether the client disconnected), or BodyTooLarge once it passes `limit`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), False


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and not declared.strip().isdigit():
            await self._refuse(scope, receive, send, 400, "Content-Length must be a number")
            return
        if declared is not None and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, 413, self._too_large())
            return
        try:
            body, disconnected = await read_body(receive, self.max_bytes)
        except BodyTooLarge:
            await self._refuse(scope, receive, send, 413, self._too_large())
            return
        if disconnected:
            return  # nobody is left to answer
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: only http.disconnect can come
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, reason: str) -> None:
        response = error_response(status, reason)
        # The rest of the body is never read: the connection cannot carry another request.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

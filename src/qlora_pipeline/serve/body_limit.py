"""A request-body size limit for the chat app, enforced before the body is read.

The app's per-field caps (``settings.Limits``) run after Gradio has parsed the request, and a
100 MB JSON body costs about a gigabyte and seconds to parse first. Written by hand because
nothing in the stack limits a body: Starlette, FastAPI and uvicorn have no such setting, and
Gradio's ``max_file_size`` covers uploads only. An ASGI middleware, passed to Gradio's FastAPI
app through ``launch(app_kwargs={"middleware": ...})``.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    """Raised inside ``receive`` when the streamed body passes the limit."""


class BodyLimit:
    """Refuse HTTP requests whose body is over ``max_bytes`` with 413: at once when the declared
    Content-Length says so, else as soon as the streamed (chunked) body passes it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(send, int(declared), scope)
            return
        guard = _StreamGuard(self.max_bytes, receive, send)
        try:
            await self.app(scope, guard.receive, guard.send)
        except BodyTooLarge:
            pass
        if guard.over and not guard.started:
            await self.refuse(send, guard.received, scope)

    async def refuse(self, send, size: int, scope) -> None:
        # the path and sizes only: never a value from the request body
        log.warning(
            "refused a %s-byte request to %s: the limit is %s bytes",
            f"{size:,}",
            scope.get("path", "?")[:200],
            f"{self.max_bytes:,}",
        )
        body = json.dumps({"error": f"request body over {self.max_bytes:,} bytes; send less"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _StreamGuard:
    """Counts body bytes as the app reads them; past the limit, stops the read and keeps the
    app's own (error) response from going out, so that the 413 is the only answer."""

    def __init__(self, max_bytes: int, receive, send):
        self.max_bytes, self._receive, self._send = max_bytes, receive, send
        self.received = 0
        self.over = False
        self.started = False

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                self.over = True
                raise BodyTooLarge
        return message

    async def send(self, message):
        if self.over:  # the app answered the failed read (FastAPI: 400): replaced by the 413
            return
        self.started = self.started or message["type"] == "http.response.start"
        await self._send(message)

"""The app's request-body limit: over-size bodies get 413 before the app reads them, declared or
streamed; bodies within it reach the app unchanged."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from qlora_pipeline.serve.body_limit import BodyLimit

LIMIT = 1_000
reads: list[int] = []


async def echo_length(request):
    body = await request.body()
    reads.append(len(body))
    return JSONResponse({"bytes": len(body)})


def client() -> TestClient:
    app = Starlette(
        routes=[Route("/", echo_length, methods=["POST"])], middleware=[Middleware(BodyLimit, max_bytes=LIMIT)]
    )
    return TestClient(app)


def test_a_body_within_the_limit_reaches_the_app():
    reads.clear()
    reply = client().post("/", content=b"x" * LIMIT)
    assert reply.status_code == 200 and reply.json() == {"bytes": LIMIT} and reads == [LIMIT]


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs():
    reads.clear()
    reply = client().post("/", content=b"x" * (LIMIT + 1))
    assert reply.status_code == 413 and "over 1,000 bytes" in reply.json()["error"]
    assert reads == []


def test_a_streamed_body_is_cut_off_once_it_passes_the_limit():
    reads.clear()

    def chunks():  # no Content-Length: sent chunked
        for _ in range(100):
            yield b"x" * 300

    reply = client().post("/", content=chunks())
    assert reply.status_code == 413 and reads == []  # the handler never got a body
    assert "over 1,000 bytes" in reply.json()["error"]


# The middleware as an ASGI server drives it: what it passes on, reads and sends, message by message.


def drive(app, scope: dict, body_chunks: list[bytes]) -> tuple[list[dict], list[str]]:
    """Run ``BodyLimit(app)`` on one request; (messages sent to the client, the calls made)."""
    import asyncio

    calls: list[str] = []
    sent: list[dict] = []
    chunks = list(body_chunks)

    async def receive():
        calls.append("receive")
        body = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    asyncio.run(BodyLimit(app, max_bytes=LIMIT)({"type": "http", "path": "/", **scope}, receive, send))
    return sent, calls


async def reading_app(scope, receive, send):
    """Reads the whole body, then answers 200 with its length; a failed read is answered 400, as
    FastAPI does."""
    total = 0
    try:
        while True:
            message = await receive()
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
    except Exception:
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"bad request"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(total).encode()})


def statuses(sent: list[dict]) -> list[int]:
    return [m["status"] for m in sent if m["type"] == "http.response.start"]


def test_other_connections_pass_through_untouched():
    """Lifespan and websocket connections reach the app with the server's own receive and send."""
    import asyncio

    seen = []

    async def app(scope, receive, send):
        seen.append((scope, receive, send))

    async def receive():
        return {}

    async def send(message):
        return None

    scope = {"type": "lifespan"}
    asyncio.run(BodyLimit(app, max_bytes=LIMIT)(scope, receive, send))
    assert seen == [(scope, receive, send)]


def test_a_declared_length_over_the_limit_gets_a_complete_413_without_a_read(caplog):
    path = "/" + "p" * 300
    with caplog.at_level("WARNING", logger="qlora_pipeline.serve.body_limit"):
        sent, calls = drive(reading_app, {"path": path, "headers": [(b"content-length", b"3000")]}, [b"x" * 3000])
    assert calls == []  # neither the app nor the body was touched
    start, body = sent
    headers = dict(start["headers"])
    assert start["status"] == 413 and headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close" and int(headers[b"content-length"]) == len(body["body"])
    assert b"over 1,000 bytes" in body["body"]
    [line] = caplog.messages
    assert line == f"refused a 3,000-byte request to {path[:200]}: the limit is 1,000 bytes"


def test_a_body_in_chunks_counts_every_chunk():
    """Four chunks of 300 bytes, each under the limit, 1,200 in all: refused, the app's 400 replaced."""
    sent, _ = drive(reading_app, {"headers": []}, [b"x" * 300] * 4)
    assert statuses(sent) == [413]
    sent, _ = drive(reading_app, {}, [b"x" * 250] * 4)  # 1,000: within, and no headers at all
    assert statuses(sent) == [200] and sent[-1]["body"] == b"1000"


def test_an_answer_already_started_is_not_followed_by_a_second_one():
    """An app that starts its answer before reading on: a body going over the limit ends the read,
    and no 413 is sent after the response has begun (that would break the protocol)."""

    async def streaming_app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while (await receive()).get("more_body"):
                pass
        finally:
            await send({"type": "http.response.body", "body": b"done"})

    sent, _ = drive(streaming_app, {}, [b"x" * 600] * 3)
    assert statuses(sent) == [200]

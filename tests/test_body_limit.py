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

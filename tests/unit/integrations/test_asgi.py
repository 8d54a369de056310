"""ASGI middleware: a real Starlette app served through httpx's ASGI transport."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import CollectorRegistry

from integrations import Recorder, exporters, flag, triggers
from integrations.asgi import ForensicsMiddleware

starlette = pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")


def _app(model):  # type: ignore[no-untyped-def]
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        ids = torch.tensor([body["ids"]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=2, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        if body.get("bad"):
            flag("client_reported")
        return JSONResponse({"new": new})

    def sync_endpoint(request: Request) -> JSONResponse:  # runs in a thread pool
        flag("from_thread")
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/generate", generate, methods=["POST"]),
                             Route("/sync", sync_endpoint)])


def test_requests_become_incidents_with_headers(tiny_gpt2):  # type: ignore[no-untyped-def]
    ex = exporters.InMemoryExporter()
    with Recorder(tiny_gpt2, sites=["blocks.0.mlp"], exporter=ex,
                  trigger=triggers.AnyOf(triggers.OnFlag(), triggers.Header("x-capture")),
                  metrics_registry=CollectorRegistry()) as rec:
        app = ForensicsMiddleware(_app(tiny_gpt2), recorder=rec)
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

        async def run() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                return [
                    await c.post("/generate", json={"ids": [5, 6, 7]},
                                 headers={"x-request-id": "quiet"}),
                    await c.post("/generate", json={"ids": [5, 6, 7], "bad": True},
                                 headers={"x-request-id": "flagged", "x-tenant-id": "acme",
                                          "traceparent": tp}),
                    await c.post("/generate", json={"ids": [8, 9]},
                                 headers={"x-request-id": "sampled", "x-capture": "1"}),
                    await c.get("/sync", headers={"x-request-id": "threaded"}),
                ]

        responses = asyncio.run(run())
        assert all(r.status_code == 200 for r in responses)
        assert responses[1].headers["x-forensics-request-id"] == "flagged"
        rec.force_flush(timeout_s=10)
    by_id = {i.manifest["request"]["id"]: i for i in ex.incidents}
    assert set(by_id) == {"flagged", "sampled", "threaded"}
    m = by_id["flagged"].manifest
    assert m["request"]["tenant"] == "acme" and m["request"]["traceparent"] == tp
    assert m["activations"] == "replay"             # flagged after the model ran
    assert by_id["sampled"].manifest["activations"] == "captured"
    assert by_id["sampled"].steps("blocks.0.mlp") == [0, 1]

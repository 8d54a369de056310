"""External calls: recorded inside a request, called through outside one, and replayed from the
recording inside a sandbox — where the real function is never reached."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

import integrations
from integrations.errors import ReplayError
from integrations.external import RecordedCallError, external_call, recorded, sandbox


class FakeSearch:
    """A tool that counts its invocations (the 'outside world')."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, query: str, k: int = 2) -> list[str]:
        self.calls += 1
        if query == "boom":
            raise TimeoutError("search backend timed out")
        return [f"{query}-{i}" for i in range(k)]


def test_outside_a_request_calls_through() -> None:
    tool = FakeSearch()
    search = recorded("search")(tool)
    assert search("a", k=1) == ["a-0"]
    assert external_call("search", tool, "b") == ["b-0", "b-1"]
    assert tool.calls == 2


def test_recorded_in_request_and_replayed_without_calling_out(
        tiny_gpt2: Any) -> None:
    tool = FakeSearch()
    search = recorded("search")(tool)
    with integrations.trace(tiny_gpt2, ["blocks.0.mlp"], request_id="agent-1") as t:
        docs = search("refund policy", k=3)
        with pytest.raises(TimeoutError):
            search("boom")
        with torch.no_grad():
            tiny_gpt2(torch.tensor([[5, 6, 7]]))
    calls = t.incident.manifest["external_calls"]
    assert calls == [
        {"name": "search", "args": ["refund policy"], "kwargs": {"k": 3},
         "result": docs},
        {"name": "search", "args": ["boom"], "kwargs": {},
         "error": {"type": "TimeoutError", "message": "search backend timed out"}},
    ]
    n = tool.calls
    with sandbox(calls, incident_id="agent-1") as box:
        assert search("refund policy", k=3) == docs
        with pytest.raises(RecordedCallError, match="TimeoutError"):
            search("boom")
        with pytest.raises(ReplayError, match="not recorded"):
            search("anything else")
    assert tool.calls == n  # replay never reached the outside world
    assert box.served == 2 and box.remaining == 0
    with sandbox(calls) as box, pytest.raises(ReplayError, match="diverged"):
        search("refund policy", k=4)  # different arguments


def test_replay_session_sandboxes_calls_made_during_the_forward(
        tiny_gpt2: Any) -> None:
    """A tool called from inside the model's forward (e.g. retrieval in a hook) is served from
    the incident during replay: zero real calls."""
    from analysis.replay import Replayer

    tool = FakeSearch()
    search = recorded("retrieve")(tool)
    seen: list[Any] = []

    def hook(module: Any, args: Any) -> None:
        seen.append(search("ctx", k=1))

    h = tiny_gpt2.transformer.h[0].register_forward_pre_hook(hook)
    try:
        with integrations.trace(tiny_gpt2, ["blocks.0.mlp"], request_id="r-tool") as t, \
                torch.no_grad():
            tiny_gpt2(torch.tensor([[5, 6, 7, 8]]))
        inc = t.incident
        assert [c["name"] for c in inc.manifest["external_calls"]] == ["retrieve"]
        before = tool.calls
        session = Replayer(tiny_gpt2).load(inc)
        assert session.fidelity().exact
        session.run()
        assert tool.calls == before  # 0 calls during replay
        assert seen[-1] == ["ctx-0"]
    finally:
        h.remove()
    with session.sandbox() as box:
        assert search("ctx", k=1) == ["ctx-0"] and box.remaining == 0


def test_async_and_unrecordable_calls(tiny_gpt2: Any) -> None:
    class Opaque:
        pass

    count = {"n": 0}

    @recorded("fetch")
    async def fetch(url: str) -> dict[str, Any]:
        count["n"] += 1
        return {"url": url, "status": 200}

    @recorded()
    def make_obj() -> Opaque:
        return Opaque()

    with integrations.trace(tiny_gpt2, ["blocks.0.mlp"], request_id="r-async") as t:
        assert asyncio.run(fetch("http://x")) == {"url": "http://x", "status": 200}
        assert isinstance(make_obj(), Opaque)  # the real result still comes back
        with torch.no_grad():
            tiny_gpt2(torch.tensor([[1, 2]]))
    calls = t.incident.manifest["external_calls"]
    assert calls[0]["result"] == {"url": "http://x", "status": 200}
    assert "unrecordable" in calls[1]
    with sandbox(calls):
        assert asyncio.run(fetch("http://x")) == {"url": "http://x", "status": 200}
        with pytest.raises(ReplayError, match="not recordable"):
            make_obj()
    assert count["n"] == 1

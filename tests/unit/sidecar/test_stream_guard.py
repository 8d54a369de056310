"""The upload stream guard's idle timeout counts only time spent waiting for the client: a
stream whose messages all arrived is never cancelled while the sidecar stores it, however long
that takes (on a loaded machine the commit can outlast the timeout)."""

from __future__ import annotations

from typing import Any

from sidecar._stream_guard import StreamGuard


class _Context:
    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _guard(clock: _Clock) -> StreamGuard:
    return StreamGuard(idle_timeout_s=1.0, max_messages=10, max_streams=2, clock=clock)


def test_a_finished_stream_is_not_idle_while_the_sidecar_works() -> None:
    clock, ctx = _Clock(), _Context()
    guard = _guard(clock)
    with guard.admit(ctx) as watch:  # type: ignore[arg-type]
        got = list(guard.messages(watch, iter(["header", "chunk"])))
        clock.now += 5.0                     # storing + indexing the upload takes 5 s
        assert guard.sweep() == 0 and ctx.cancelled == 0
    assert got == ["header", "chunk"] and guard.active() == 0


def test_work_on_a_chunk_does_not_count_but_waiting_does() -> None:
    clock, ctx = _Clock(), _Context()
    guard = _guard(clock)

    def slow_client() -> Any:
        yield "header"
        assert guard.sweep() == 0            # sidecar worked 5 s on the header: not idle
        clock.now += 2.0                     # now the client takes 2 s for the next message
        assert guard.sweep() == 1
        yield "chunk"

    with guard.admit(ctx) as watch:  # type: ignore[arg-type]
        it = guard.messages(watch, slow_client())
        assert next(it) == "header"
        clock.now += 5.0
        assert next(it) == "chunk"
    assert ctx.cancelled == 1

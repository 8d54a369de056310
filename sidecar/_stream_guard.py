"""Upload streams that cannot hold the sidecar hostage: slots, an idle timeout, a message cap.

A sync gRPC server gives every call a handler thread. An upload that sends its header and then
nothing would hold that thread forever, and ``grpc.max_workers`` such uploads would starve the
health check and every query. :class:`StreamGuard` bounds this three ways:

* **slots** — at most ``limits.max_concurrent_uploads`` uploads run at once (kept below
  ``grpc.max_workers``); one more is refused at once with ``RESOURCE_EXHAUSTED`` (``busy``);
* **idle timeout** — a watchdog thread cancels a stream that sent nothing for
  ``limits.idle_timeout_s`` while the sidecar waited for it (its own work on a chunk or on
  storing the finished upload never counts; counted ``idle_timeout``; the client sees
  ``CANCELLED``);
* **message cap** — a stream of more than ``limits.max_stream_messages`` messages is refused
  (``too_many_messages``), so empty chunks cannot keep one alive forever.

Example::

    guard = StreamGuard(idle_timeout_s=30, max_messages=16384, max_streams=8)
    with guard.admit(context) as watch:
        for msg in watch.messages(request_iterator):
            ...
    guard.close()
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import grpc

from ._reject import Rejection

__all__ = ["StreamGuard", "Watch"]

T = TypeVar("T")


class Watch:
    """One admitted stream: when it last made progress, how many messages it sent."""

    def __init__(self, context: grpc.ServicerContext, now: float) -> None:
        self.context = context
        self.last = now
        self.count = 0
        self.expired = False
        #: Waiting for the client's next message (only then can the stream be idle: the
        #: sidecar's own work on a chunk or on the finished upload never counts).
        self.waiting = True

    def messages(self, requests: Iterable[T], *, max_messages: int,
                 clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
        """``requests`` with progress recorded per message, the cap enforced and a cancelled
        stream turned into a counted :class:`Rejection`."""
        it = iter(requests)
        while True:
            self.last, self.waiting = clock(), True
            try:
                msg = next(it)
            except StopIteration:
                self.waiting = False
                if self.expired:      # a cancelled stream may also just end
                    raise self._gone() from None
                return
            except grpc.RpcError as e:   # cancelled: by our watchdog, the client or a deadline
                self.waiting = False
                raise self._gone() from e
            self.waiting = False
            self.count += 1
            if self.count > max_messages:
                raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "too_many_messages",
                                f"more than limits.max_stream_messages = {max_messages} "
                                "messages in one upload; send chunks of up to "
                                "limits.max_chunk_bytes")
            yield msg


    def _gone(self) -> Rejection:
        """The refusal of a stream that stopped: idle-cancelled by the watchdog, or gone."""
        if self.expired:
            return Rejection(grpc.StatusCode.DEADLINE_EXCEEDED, "idle_timeout",
                             "the upload stream was idle for longer than limits.idle_timeout_s; "
                             "send chunks without pausing")
        return Rejection(grpc.StatusCode.CANCELLED, "cancelled",
                         "the client cancelled the upload, its deadline passed, or gRPC refused "
                         "a message (e.g. larger than the transport's 4 MiB)")


class StreamGuard:
    """Slots, idle timeout and message cap for upload streams (module doc); thread-safe."""

    def __init__(self, *, idle_timeout_s: float, max_messages: int, max_streams: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_messages = int(max_messages)
        self.max_streams = int(max_streams)
        self._clock = clock
        self._lock = threading.Lock()
        self._active: set[Watch] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def admit(self, context: grpc.ServicerContext) -> Iterator[Watch]:
        """A slot for one upload (:class:`Rejection` ``busy`` when none is free)."""
        watch = Watch(context, self._clock())
        with self._lock:
            if len(self._active) >= self.max_streams:
                raise Rejection(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy",
                                f"{self.max_streams} uploads are in progress "
                                "(limits.max_concurrent_uploads); retry with backoff")
            self._active.add(watch)
            self._ensure_watchdog()
        try:
            yield watch
        finally:
            with self._lock:
                self._active.discard(watch)

    def messages(self, watch: Watch, requests: Iterable[T]) -> Iterator[T]:
        """``watch.messages`` with this guard's cap and clock."""
        return watch.messages(requests, max_messages=self.max_messages, clock=self._clock)

    def active(self) -> int:
        """Uploads holding a slot now."""
        with self._lock:
            return len(self._active)

    def _ensure_watchdog(self) -> None:
        if self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._watchdog, daemon=True,
                                            name="forensics-stream-watchdog")
            self._thread.start()

    def _watchdog(self) -> None:
        period = min(1.0, max(0.05, self.idle_timeout_s / 4))
        while not self._stop.wait(period):
            self.sweep()

    def sweep(self) -> int:
        """Cancel every stream idle for longer than the timeout; how many were cancelled."""
        now = self._clock()
        with self._lock:
            idle = [w for w in self._active
                    if w.waiting and not w.expired and now - w.last > self.idle_timeout_s]
            for w in idle:
                w.expired = True
        for w in idle:
            with contextlib.suppress(Exception):
                w.context.cancel()
        return len(idle)

    def close(self) -> None:
        """Stop the watchdog (streams still running finish on their own)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=2.0)

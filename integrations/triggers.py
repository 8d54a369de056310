"""Triggers decide which requests become incidents (like OpenTelemetry samplers, as objects).

A trigger answers two questions, both cheap and side-effect free on the model:

* :meth:`Trigger.pre` — before the first forward call: capture activations for this request?
  (``Ratio``, ``Header``, ``Always``; ``OnFlag`` when the request was flagged before the model
  ran.)
* :meth:`Trigger.post` — when the request ends: make an incident anyway? (``OnFlag`` for a
  post-hoc flag, ``OutputContains``.) A post-only incident carries inputs, outputs and RNG
  state; its activations are materialised later by deterministic replay
  (``activations: "replay"``).

Sampling never touches the model's RNG: :class:`Ratio` hashes the request id.

Example::

    from integrations import triggers
    t = triggers.AnyOf(triggers.OnFlag(), triggers.Budget(60, triggers.Ratio(0.01)))
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "AllOf",
    "Always",
    "AnyOf",
    "Budget",
    "Fire",
    "Header",
    "Never",
    "OnFlag",
    "OutputContains",
    "Ratio",
    "RequestView",
    "Trigger",
]


@dataclass(frozen=True)
class Fire:
    """A trigger's positive decision: which rule fired and why."""

    rule: str
    reason: str


@dataclass(frozen=True)
class RequestView:
    """What a trigger may look at. ``output_text`` is only set at the end of a request."""

    request_id: str
    tenant: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    flags: Sequence[str] = ()
    output_text: str | None = None


class Trigger:
    """Base class: override :meth:`pre` and/or :meth:`post`; both default to "no"."""

    def pre(self, view: RequestView) -> Fire | None:
        """Decide, before the first forward, whether to capture activations."""
        return None

    def post(self, view: RequestView) -> Fire | None:
        """Decide, at the end of the request, whether to make an incident."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Always(Trigger):
    """Capture every request (tests, the seed facade, debugging)."""

    def pre(self, view: RequestView) -> Fire | None:
        return Fire("always", "always")


class Never(Trigger):
    """Capture nothing (an installed but silent recorder)."""


class OnFlag(Trigger):
    """Fire when the request was flagged (``req.flag(...)`` / ``integrations.flag(...)``).

    Flagged before the first forward → activations are captured; flagged afterwards → a
    replay incident (inputs + outputs + RNG state).
    """

    def pre(self, view: RequestView) -> Fire | None:
        return Fire("flag", view.flags[0]) if view.flags else None

    def post(self, view: RequestView) -> Fire | None:
        return self.pre(view)


class Ratio(Trigger):
    """Sample a deterministic fraction ``p`` of requests by hashing the request id.

    The same request id always gets the same decision (across processes and restarts), and the
    model's RNG is never touched.
    """

    def __init__(self, p: float) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Ratio(p): p must be in [0, 1], got {p!r}")
        self.p = float(p)
        self._bound = int(self.p * 2**64)

    def _hit(self, request_id: str) -> bool:
        if self.p >= 1.0:
            return True
        h = int.from_bytes(hashlib.sha256(request_id.encode("utf-8")).digest()[:8], "big")
        return h < self._bound

    def pre(self, view: RequestView) -> Fire | None:
        return Fire("ratio", f"sampled p={self.p:g}") if self._hit(view.request_id) else None

    def __repr__(self) -> str:
        return f"Ratio({self.p!r})"


class Header(Trigger):
    """Fire when a request header is present (and, if ``value`` is given, equal to it)."""

    def __init__(self, name: str, value: str | None = None) -> None:
        self.name = name.lower()
        self.value = value

    def pre(self, view: RequestView) -> Fire | None:
        for k, v in view.headers.items():
            if k.lower() == self.name and (self.value is None or v == self.value):
                return Fire("header", f"{self.name}={v}")
        return None

    def __repr__(self) -> str:
        return f"Header({self.name!r}, {self.value!r})"


class OutputContains(Trigger):
    """Fire at the end of a request whose output text contains any of ``needles``.

    The output text comes from ``req.set_output(text=...)`` or, when the recorder was given a
    tokenizer, from decoding ``req.set_output(ids=...)``.
    """

    def __init__(self, *needles: str, case_sensitive: bool = True) -> None:
        if not needles:
            raise ValueError("OutputContains needs at least one string")
        self.needles = tuple(needles)
        self.case_sensitive = case_sensitive

    def post(self, view: RequestView) -> Fire | None:
        if view.output_text is None:
            return None
        text = view.output_text if self.case_sensitive else view.output_text.lower()
        for n in self.needles:
            if (n if self.case_sensitive else n.lower()) in text:
                return Fire("output_contains", n)
        return None

    def __repr__(self) -> str:
        return f"OutputContains({', '.join(map(repr, self.needles))})"


class AnyOf(Trigger):
    """Fire when any child fires (first child's decision wins)."""

    def __init__(self, *children: Trigger) -> None:
        self.children = children

    def pre(self, view: RequestView) -> Fire | None:
        return _first(c.pre(view) for c in self.children)

    def post(self, view: RequestView) -> Fire | None:
        return _first(c.post(view) for c in self.children)

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.children))})"


def _first(fires: Iterable[Fire | None]) -> Fire | None:
    """The first positive decision; later children are not asked (lazy)."""
    return next((f for f in fires if f is not None), None)


class AllOf(Trigger):
    """Fire when every child fires (at ``pre`` all must fire at ``pre``; at ``post`` each child
    may have fired at either point)."""

    def __init__(self, *children: Trigger) -> None:
        if not children:
            raise ValueError("AllOf needs at least one trigger")
        self.children = children

    def pre(self, view: RequestView) -> Fire | None:
        fires = [c.pre(view) for c in self.children]
        return _join(fires)

    def post(self, view: RequestView) -> Fire | None:
        fires = [c.pre(view) or c.post(view) for c in self.children]
        return _join(fires)

    def __repr__(self) -> str:
        return f"AllOf({', '.join(map(repr, self.children))})"


def _join(fires: list[Fire | None]) -> Fire | None:
    if any(f is None for f in fires):
        return None
    done = [f for f in fires if f is not None]
    return Fire("+".join(f.rule for f in done), "; ".join(f.reason for f in done))


class Budget(Trigger):
    """Cap how often ``inner`` may fire: at most ``max_per_minute`` (token bucket).

    Decisions beyond the budget are "no" (suppressed, counted in :attr:`suppressed`), so a flood
    of flags cannot flood the sidecar.
    """

    def __init__(self, max_per_minute: float, inner: Trigger, *,
                 clock: object = time.monotonic) -> None:
        if max_per_minute <= 0:
            raise ValueError("Budget(max_per_minute): must be > 0")
        self.rate = float(max_per_minute) / 60.0
        self.capacity = float(max_per_minute)
        self.inner = inner
        self._clock = clock
        self._tokens = self.capacity
        self._last: float | None = None
        self._lock = threading.Lock()
        self.suppressed = 0

    def _take(self) -> bool:
        now = self._clock()  # type: ignore[operator]
        with self._lock:
            if self._last is not None:
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            self.suppressed += 1
            return False

    def pre(self, view: RequestView) -> Fire | None:
        f = self.inner.pre(view)
        return f if f is not None and self._take() else None

    def post(self, view: RequestView) -> Fire | None:
        f = self.inner.post(view)
        return f if f is not None and self._take() else None

    def __repr__(self) -> str:
        return f"Budget({self.capacity:g}, {self.inner!r})"

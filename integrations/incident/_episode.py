"""Episodes: one incident made of several model calls and the tool calls between them.

An agent loop (model call, tool call, model call, ...) or a conversation (one model call per
turn) served inside one ``rec.request(...)`` is **one** incident. Its forward calls are numbered
as always (one ``step`` per forward call across the whole request, DESIGN §3), its external calls
are the manifest's ``external_calls`` (:mod:`integrations.external`), and the optional manifest
key ``episode`` orders them::

    "episode": {"version": 1, "steps": [
        {"kind": "model", "forward_steps": [0, 7], "cache": "new"},      # a generate(): prefill
        {"kind": "tool", "call": 0, "name": "run_sql"},                  #   + 7 decode calls
        {"kind": "model", "forward_steps": [8, 20], "cache": "new"},     # cache recomputed
        {"kind": "model", "forward_steps": [21, 30], "cache": "carried"}]}  # next turn, KV kept

``forward_steps`` is the inclusive range of forward calls of that model call; ``cache`` says how
it was served: ``"new"`` (an empty KV cache: a fresh ``generate()``), ``"carried"`` (the previous
model call's cache continued: a conversation turn fed on top of it), ``"none"`` (a plain forward
without cache). ``call`` indexes ``external_calls``. The recorder writes the key only when there is
more than one step; an incident without it (every incident written before episodes existed) is
one model call with a new cache — exactly how it was always replayed, so old incidents load and
replay unchanged and ``format_version`` is not bumped. Replay resets the KV cache at every
``"new"``/``"none"`` model step (:class:`analysis.replay.CallPlan`).

How the recorder sees a model call begin (per forward call, from the call's own arguments): a
call with no cache or an empty one starts a ``"new"`` model call; a call that feeds more than one
token on top of a non-empty cache starts a ``"carried"`` one (a decode step feeds one); so does any
forward call after a tool call.

Example::

    ep = Episode.from_manifest(inc.manifest, forward_steps=len(inc.steps("blocks.0.mlp")))
    [s.kind for s in ep.steps]          # ['model', 'tool', 'model']
    ep.cache_resets()                   # frozenset({0, 8}): forward calls that start a new cache
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from integrations.errors import IncidentFormatError

__all__ = ["EPISODE_VERSION", "CacheUse", "Episode", "EpisodeLog", "EpisodeStep"]

EPISODE_VERSION = 1
CacheUse = Literal["new", "carried", "none"]
_CACHES = ("new", "carried", "none")


@dataclass(frozen=True)
class EpisodeStep:
    """One step of an episode: a model call (``first``..``last`` forward calls, its ``cache``)
    or a tool call (``call``: index into ``external_calls``, ``name``)."""

    kind: Literal["model", "tool"]
    first: int = -1
    last: int = -1
    cache: CacheUse = "new"
    call: int = -1
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.kind == "model":
            return {"kind": "model", "forward_steps": [self.first, self.last],
                    "cache": self.cache}
        return {"kind": "tool", "call": self.call, "name": self.name}


@dataclass(frozen=True)
class Episode:
    """The ordered steps of an incident (see the module doc); :meth:`from_manifest` reads and
    validates the manifest's ``episode`` (untrusted), or makes the one-model-call default."""

    steps: tuple[EpisodeStep, ...]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], *, forward_steps: int) -> Episode:
        """The episode of a manifest whose incident has ``forward_steps`` forward calls.

        Raises :class:`~integrations.errors.IncidentFormatError` when ``episode`` is malformed
        or does not cover forward calls ``0..forward_steps-1`` in order, exactly once.
        """
        raw = manifest.get("episode")
        if raw is None:
            return cls((EpisodeStep("model", 0, forward_steps - 1, "new"),))
        if not isinstance(raw, Mapping) or raw.get("version") != EPISODE_VERSION or \
                not isinstance(raw.get("steps"), list) or not raw["steps"]:
            raise IncidentFormatError(
                f"manifest 'episode' must be {{'version': {EPISODE_VERSION}, 'steps': [...]}}; "
                "the incident was written by an incompatible recorder")
        n_calls = len(manifest.get("external_calls") or [])
        steps = tuple(_parse_step(s, i, n_calls) for i, s in enumerate(raw["steps"]))
        ep = cls(steps)
        covered = [k for s in ep.model_steps() for k in range(s.first, s.last + 1)]
        if covered != list(range(forward_steps)):
            raise IncidentFormatError(
                f"manifest 'episode' covers forward calls {_span(covered)} but the incident has "
                f"{forward_steps}; its model steps must cover 0..{forward_steps - 1} in order")
        return ep

    def model_steps(self) -> list[EpisodeStep]:
        """The model calls, in order."""
        return [s for s in self.steps if s.kind == "model"]

    def cache_resets(self) -> frozenset[int]:
        """Forward calls that start with an empty (or no) KV cache."""
        return frozenset(s.first for s in self.model_steps() if s.cache != "carried")

    def starts(self) -> frozenset[int]:
        """Forward calls that start a model call (a new prompt, not a decode step)."""
        return frozenset(s.first for s in self.model_steps())

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``episode`` value."""
        return {"version": EPISODE_VERSION, "steps": [s.to_json() for s in self.steps]}


def _parse_step(s: Any, i: int, n_calls: int) -> EpisodeStep:
    bad = IncidentFormatError(f"manifest 'episode' step {i} is malformed: {s!r:.200}")
    if not isinstance(s, Mapping):
        raise bad
    if s.get("kind") == "model":
        fs, cache = s.get("forward_steps"), s.get("cache")
        if not (isinstance(fs, list) and len(fs) == 2 and all(type(x) is int for x in fs)
                and 0 <= fs[0] <= fs[1] and cache in _CACHES):
            raise bad
        return EpisodeStep("model", fs[0], fs[1], cache)
    if s.get("kind") == "tool":
        call, name = s.get("call"), s.get("name")
        if type(call) is not int or not 0 <= call < n_calls or \
                not (name is None or isinstance(name, str)):
            raise bad
        return EpisodeStep("tool", call=call, name=name)
    raise bad


def _span(steps: Sequence[int]) -> str:
    return f"{steps[:6]}{'...' if len(steps) > 6 else ''} ({len(steps)})"


@dataclass
class EpisodeLog:
    """What the recorder notes while a request is served (serving thread; cheap appends).

    Example::

        log = EpisodeLog()
        log.forward(0, cache_len=0, tokens=12); log.forward(1, cache_len=12, tokens=1)
        log.tool(0, "run_sql")
        log.forward(2, cache_len=0, tokens=30)
        log.section(last_step=2)["steps"][1]      # {'kind': 'tool', 'call': 0, 'name': 'run_sql'}
    """

    events: list[EpisodeStep] = field(default_factory=list)
    _after_tool: bool = True

    def forward(self, step: int, *, cache_len: int | None, tokens: int) -> None:
        """Forward call ``step`` fed ``tokens`` new positions on a cache of ``cache_len``
        (None: no cache passed)."""
        if cache_len is None or cache_len == 0:
            cache: CacheUse | None = "none" if cache_len is None else "new"
        elif self._after_tool or tokens > 1:
            cache = "carried"
        else:
            cache = None  # a decode step of the current model call
        if cache is not None or not self.events:
            self.events.append(EpisodeStep("model", step, step, cache or "new"))
        self._after_tool = False

    def tool(self, call: int, name: str) -> None:
        """External call number ``call`` (its index in ``external_calls``) was made."""
        self.events.append(EpisodeStep("tool", call=call, name=name))
        self._after_tool = True

    def section(self, *, last_step: int) -> dict[str, Any] | None:
        """The manifest's ``episode`` (None for a single model call: the default)."""
        steps: list[EpisodeStep] = []
        models = [i for i, e in enumerate(self.events) if e.kind == "model"]
        for i, e in enumerate(self.events):
            if e.kind == "model":
                nxt = next((self.events[j].first for j in models if j > i), last_step + 1)
                e = EpisodeStep("model", e.first, nxt - 1, e.cache)
            steps.append(e)
        if len(steps) <= 1:
            return None
        return Episode(tuple(steps)).to_manifest()

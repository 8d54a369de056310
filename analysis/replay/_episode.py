"""Re-running an episode's application (an agent loop, a conversation) in the replay sandbox.

:meth:`ReplaySession.fidelity` replays an episode's *forward calls* (teacher-forced, the KV cache
reset where the episode's model calls started afresh). :func:`rerun_episode` runs the
*application* again — the caller's agent function, which calls the model and its tools as in
production — inside the session's deterministic environment and external-call sandbox, records
the re-run with :func:`integrations.trace`, and compares it step by step with the incident:

* without ``standins`` every tool call is answered from the recording (a call that was not
  recorded raises :class:`~integrations.errors.ReplayError`; the real tool is never reached), and
  an unchanged model reproduces every forward call bit for bit (:attr:`EpisodeRun.exact`);
* with ``standins`` (name -> a local stand-in, e.g. SQL on an in-process copy of the database
  restored to its recorded state) and a change applied — ``with fix.apply(model):`` around the
  call — the episode runs forward on its own: calls that still match the recording are answered
  from it, the first one that differs and every later one go to the stand-ins, never outside.

Example::

    session = Replayer(model).load(inc)
    run = rerun_episode(session, lambda: agent(model, tok, task))
    run.exact, run.first_difference, run.served, run.local_calls    # True, None, 2, 0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ._fidelity import compare

if TYPE_CHECKING:
    from integrations.incident import Incident

    from ._session import ReplaySession

__all__ = ["EpisodeRun", "first_difference", "rerun_episode"]

T = TypeVar("T")


@dataclass(frozen=True)
class EpisodeRun(Generic[T]):
    """A re-run of an episode's application (see the module doc).

    ``incident``: the re-run as recorded; ``result``: what the agent function returned;
    ``exact``: same number of forward calls, each with the same inputs and bit-identical logits;
    ``first_difference``: the first forward call that differs (None when exact);
    ``served``: tool calls answered from the recording; ``local_calls``: answered by stand-ins;
    ``diverged_at``: index of the first tool call that differed from the recording;
    ``remaining``: recorded tool calls the re-run never made.
    """

    incident: Incident
    result: T
    exact: bool
    first_difference: int | None
    forward_calls: int
    served: int
    local_calls: int
    diverged_at: int | None
    remaining: int


def rerun_episode(session: ReplaySession, agent: Callable[[], T], *,
                  standins: Mapping[str, Callable[..., Any]] | None = None,
                  request_id: str | None = None) -> EpisodeRun[T]:
    """Run ``agent()`` (which serves the episode on ``session.model``) in the sandbox and compare
    its forward calls with ``session.incident`` (see the module doc)."""
    import integrations

    with session.application_environment(standins=standins) as box, \
            integrations.trace(session.model, [], request_id=request_id,
                               reason="episode-rerun", capture_logits=True) as t:
        result = agent()
    rerun = t.incident
    first = first_difference(session.incident, rerun)
    n = _forward_calls(rerun)
    return EpisodeRun(incident=rerun, result=result, exact=first is None, first_difference=first,
                      forward_calls=n, served=box.served, local_calls=box.local_calls,
                      diverged_at=box.diverged_at, remaining=box.remaining)


def _forward_calls(inc: Incident) -> int:
    return len({r.step for r in inc.records(kind="input")})


def first_difference(recorded: Incident, rerun: Incident) -> int | None:
    """The first forward call whose inputs or last-position logits differ between two
    incidents (bitwise), or where one has a call the other lacks; None when identical."""
    a = {(r.step, r.site): r.tensor for r in recorded.records(kind="input")}
    b = {(r.step, r.site): r.tensor for r in rerun.records(kind="input")}
    la, lb = _logits(recorded), _logits(rerun)
    steps = sorted({s for s, _ in a} | {s for s, _ in b})
    for step in steps:
        keys = {k for k in a if k[0] == step} | {k for k in b if k[0] == step}
        for k in sorted(keys):
            if k not in a or k not in b or not compare(b[k], a[k]).exact:
                return step
        if (step in la) != (step in lb) or (step in la and not compare(lb[step], la[step]).exact):
            return step
    return None


def _logits(inc: Incident) -> dict[int, Any]:
    return {r.step: r.tensor for r in inc.records(kind="logits") if r.site == "logits"}

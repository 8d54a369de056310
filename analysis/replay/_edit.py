"""Replay's one primitive: make the recorded forward calls with an *edit* hooked on sites.

An edit is baukit's ``edit_output`` idea — a function called with each hooked site's value during
every forward call, returning the replacement or ``None`` (or the value itself) to leave it::

    def edit(site: BoundSite, value: torch.Tensor, *, step: int) -> torch.Tensor | None

``site`` is the resolved site (``site.site`` its canonical name; ``site.index`` its selectors as
an index into ``value``, the site's full tensor); ``step`` the forward call (0 = prefill, then
one per decode step); a replacement has the value's shape and dtype. Everything above replay
that changes activations — interventions and their batched plans, attribution's gradient leaves
— is an edit run by :meth:`~analysis.replay.ReplaySession.run_edited`; :func:`replay_calls` is
the loop it runs inside the session's deterministic environment.

Example::

    def halve(site, value, *, step):
        return value * 0.5 if step == 0 else None       # only the prefill call
    r = session.run_edited(halve, sites=["blocks.1.mlp"], capture=["blocks.2.resid_post"])
    r.activations["blocks.2.resid_post"][0]             # after the edit
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from integrations.errors import InterventionError
from integrations.sites import BoundSite, attach

from ._calls import CallPlan, last_logits, to_device

__all__ = ["BoundEdit", "Edit", "ReplayedCalls", "replay_calls", "spec_type"]

S = TypeVar("S")


class Edit(Protocol):
    """``edit(site, value, *, step) -> replacement | None`` (see the module doc)."""

    def __call__(self, site: BoundSite, value: torch.Tensor, /, *,
                 step: int) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class BoundEdit:
    """An edit and the resolved sites it is called on (what an edit specification compiles to).

    Example::

        BoundEdit(sites=tuple(resolve_sites(model, ["blocks.1.mlp"])), edit=halve)
    """

    sites: tuple[BoundSite, ...]
    edit: Edit


@dataclass
class ReplayedCalls:
    """What :func:`replay_calls` returns: per forward call, the last-position logits, the
    ``input_ids`` fed, and ``{site: [value per call]}`` of the captured sites."""

    logits: list[torch.Tensor | None]
    input_ids: list[torch.Tensor | None]
    activations: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def replay_calls(model: torch.nn.Module, plan: CallPlan, *, bound: BoundEdit | None,
                 capture: Sequence[BoundSite], repeat: int = 1, greedy: bool = False,
                 last_step: int | None = None, device: torch.device,
                 keep_graph: bool = False) -> ReplayedCalls:
    """Make ``plan``'s forward calls (0..``last_step``) with ``bound`` hooked; capture sites.

    The incident's batch is replicated ``repeat`` times (row block ``r`` = copy ``r``). Captured
    values are those after the edit (a capture site on an edited module sees the replacement).
    ``greedy=True`` feeds each decode call the previous call's argmax instead of the recorded
    token. ``keep_graph=True`` returns the logits attached to the autograd graph (the caller
    enables gradients); otherwise detached copies. Runs in the caller's environment.
    """
    cap = [dataclasses.replace(b) for b in capture]  # own identities: a site may also be edited
    cap_ids = {id(b): b.site for b in cap}
    acts: dict[str, list[torch.Tensor]] = {b.site: [] for b in cap}
    edit = bound.edit if bound is not None else None
    hooked = [*(bound.sites if bound is not None else ()), *cap]
    step_now = [0]

    def fn(b: BoundSite, v: torch.Tensor) -> torch.Tensor | None:
        site = cap_ids.get(id(b))
        if site is not None:
            acts[site].append(v.detach().clone())
            return None
        assert edit is not None
        return edit(b, v, step=step_now[0])

    calls = plan.steps if last_step is None else plan.steps[:last_step + 1]
    out = ReplayedCalls(logits=[], input_ids=[], activations=acts)
    cache = plan.new_cache(model)
    with attach(model, hooked, fn) if hooked else contextlib.nullcontext():
        nxt: torch.Tensor | None = None
        for call in calls:
            step_now[0] = call.step
            if call.step in plan.resets and call.step != calls[0].step:
                cache = plan.new_cache(model)  # the next model call of an episode
            decode = call.step not in plan.starts
            kw = plan.kwargs(call, repeat=repeat, cache=cache,
                             input_ids=nxt if greedy and decode else None)
            if device.type != "cpu":
                kw = to_device(kw, device)
            lg = last_logits(model(**kw))
            out.logits.append(lg if lg is None or keep_graph else lg.detach().clone())
            out.input_ids.append(kw.get("input_ids"))
            if greedy and lg is not None:
                nxt = lg.argmax(-1, keepdim=True).to(torch.long)
    return out


def spec_type(sets: Sequence[Sequence[S]]) -> type[S] | None:
    """The edit-specification type ``sets`` hold (None when every set is empty), after checking
    that they are sets of specifications (elements whose type has ``bind_sets``)."""
    found: type[S] | None = None
    for i, s in enumerate(sets):
        if not isinstance(s, Sequence):
            raise InterventionError(
                "run_batch() takes a list of intervention *sets* (lists); wrap single "
                "interventions: run_batch([[iv1], [iv2]])")
        for x in s:
            if not callable(getattr(type(x), "bind_sets", None)):
                raise InterventionError(
                    f"set {i} holds {type(x).__name__}; build "
                    "analysis.interventions.Intervention(site, kind, ...)")
            found = found or type(x)
    return found

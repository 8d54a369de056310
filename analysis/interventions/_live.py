"""Interventions on a live model, for any input: how a fix is deployed and checked (DESIGN §14).

During replay, interventions address the incident's own forward calls (absolute positions,
steps, donors replayed for that incident). A *portable* intervention is one whose meaning does
not depend on the incident: no donor run (``patch`` from an incident or prompt), no step
numbers, positions only counted from the newest token of each forward call (``[pos=-1]``,
``[pos=-4:]``) or none. ``zero``, ``scale``, ``mean`` (the baseline's mean vector),
``project`` and ``steer`` are portable; :func:`applied` installs them with forward hooks that
are always removed on exit, and :func:`check_portable` says why one is not.

Example::

    with applied(model, fix.interventions):
        out = model.generate(**tokenizer("any prompt", return_tensors="pt"))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from integrations.errors import InterventionError
from integrations.sites import BoundSite, attach, resolve_sites

from ._gate import GateTracker, PromptGate
from ._intervention import Intervention
from ._plan import VECTOR_KINDS, localize

__all__ = ["applied", "check_portable"]

_PORTABLE = ("zero", "scale", "mean", *VECTOR_KINDS)


def _positions_portable(b: BoundSite) -> bool:
    """Whether the bound site's position selector counts from the newest token (or is absent)."""
    if len(b.index) < 2:
        return True
    entry = b.index[1]
    if entry is Ellipsis or entry == slice(None):
        return True
    if isinstance(entry, int):
        return entry < 0
    if isinstance(entry, slice):
        return (entry.start is None or entry.start < 0) and \
            (entry.stop is None or entry.stop <= 0) and entry.step in (None, 1)
    if isinstance(entry, tuple):
        flat = [e[0] if isinstance(e, tuple) else e for e in entry]
        return all(isinstance(p, int) and p < 0 for p in flat)
    return True


def check_portable(iv: Intervention, bound: Sequence[BoundSite] | None = None) -> None:
    """Raise :class:`InterventionError` saying why ``iv`` cannot be applied to any input."""
    if iv.kind not in _PORTABLE:
        raise InterventionError(
            f"{iv.label} is not portable: {iv.kind!r} needs a donor run for one incident; a "
            f"fix applied to live traffic uses one of {', '.join(_PORTABLE)}")
    if iv.steps is not None:
        raise InterventionError(f"{iv.label} is not portable: steps= number one incident's "
                                "forward calls; drop steps= (a live model has no incident)")
    for b in bound or ():
        if not _positions_portable(b):
            raise InterventionError(
                f"{iv.label} is not portable: positions must count from the newest token "
                "of each call ([pos=-1], [pos=-4:]) or be absent; absolute positions only "
                "mean something for one incident")


def _apply_one(iv: Intervention, b: BoundSite, out: torch.Tensor, gates: GateTracker) -> None:
    """Apply ``iv`` in place on ``out`` (the site's full tensor of one forward call)."""
    rest = list(b.index[1:])
    if out.dim() >= 3 and rest:
        loc = localize(rest[0], 0, out.shape[1])
        if loc is None:
            return
        rest[0] = loc
    sel = (b.index[0] if b.index else slice(None), *rest)
    if iv.kind == "zero":
        out[sel] = 0
    elif iv.kind == "scale":
        assert iv.factor is not None
        out[sel] = out[sel] * iv.factor
    elif iv.kind == "mean":
        assert iv.baseline is not None
        vec = iv.baseline.mean(iv.site).to(out.device, out.dtype)
        out[sel] = vec.expand_as(out)[sel]
    elif isinstance(iv.gate, PromptGate):
        out[sel] = gates.apply(iv.gate, out[sel], slice(None), prefill=out.shape[1] > 1,
                               transform=iv.transform)
    else:
        out[sel] = iv.transform(out[sel])


@contextlib.contextmanager
def applied(model: torch.nn.Module, interventions: Sequence[Intervention]) -> Iterator[Any]:
    """Install ``interventions`` (portable ones, see the module doc) on ``model`` for every
    forward call inside the block, whatever the input; hooks are removed on exit.

    Example::

        with applied(model, [Intervention("blocks.9.resid_post", "project", direction=sub)]):
            model.generate(ids, max_new_tokens=16, do_sample=False)
    """
    by_site: dict[str, list[tuple[Intervention, BoundSite]]] = {}
    bound: dict[str, BoundSite] = {}
    for iv in interventions:
        resolved = resolve_sites(model, [iv.site])
        check_portable(iv, resolved)
        for b in resolved:
            by_site.setdefault(b.site, []).append((iv, b))
            bound.setdefault(b.site, b)
    gates = GateTracker(iv.gate for iv in interventions if isinstance(iv.gate, PromptGate))
    for site in gates.sites:
        for b in resolve_sites(model, [site]):
            bound.setdefault(b.site, b)

    def edit(b: BoundSite, value: torch.Tensor) -> torch.Tensor | None:
        # a call feeding more than one position is a prompt (prefill); decode calls feed one
        gates.observe(b.site, value, prefill=value.dim() >= 3 and value.shape[1] > 1)
        todo = by_site.get(b.site)
        if not todo:
            return None
        out = value.clone()
        for iv, site in todo:
            _apply_one(iv, site, out, gates)
        return out

    with attach(model, list(bound.values()), edit) as attachment:
        yield attachment

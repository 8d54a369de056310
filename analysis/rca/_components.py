"""Components: which heads and MLPs carry the failure at the positions the trace marks
(DESIGN §14 step 3) — CCA with ``patch`` from the benign twin, the side-effect budget as a
search constraint.

Candidates are every attention head and MLP output of the layers around the decision layer
(all layers when there is none), restricted to the aligned tail — the positions after the
inserted span, where the trace found the decision — and patched from the twin (teacher-forced
on the incident's decode tokens). The search is :class:`~analysis.cca.CausalCCA`'s (verified,
1-minimal). Its side effects are measured on benign incidents (the same patches applied to
them); when they exceed the budget, the components of that set are excluded and the search
runs again (at most ``rounds`` times), so a set is only reported as within budget if it is.

Example::

    fix = components(session, failure=f, twin_ids=twin, trace=tr, benign=benign, tokenizer=tok)
    fix.sites, fix.side_effects.mean_kl, fix.notes
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analysis.cca import CausalCCA, Failure, FixSet
from analysis.replay import ReplaySession
from integrations.incident import Incident

from ._trace import CausalTrace
from ._twins import aligned_tail

__all__ = ["components", "tail_candidates"]


def tail_candidates(n_layers: int, suffix: int, decision_layer: int | None, *,
                    window: int = 3) -> list[str]:
    """Heads and MLP outputs at the aligned tail, in the layers around the decision layer."""
    if decision_layer is None:
        layers = range(n_layers)
    else:
        layers = range(max(0, decision_layer - window), min(n_layers, decision_layer + 2))
    out = []
    for layer in layers:
        out += [f"blocks.{layer}.attn.z[head=*][pos=-{suffix}:]",
                f"blocks.{layer}.mlp[pos=-{suffix}:]"]
    return out


def components(session: ReplaySession, *, failure: Failure, twin_ids: Sequence[int],
               trace: CausalTrace | None, benign: Sequence[Incident], tokenizer: Any,
               budget_kl: float = 0.1, max_size: int = 8, rounds: int = 3,
               max_benign: int = 8) -> FixSet:
    """The components' fix set (module doc); ``fix.notes`` records excluded rounds."""
    ids = [int(t) for t in session.plan.steps[0].tensors["input_ids"][0]]
    _, _, suffix = aligned_tail(ids, twin_ids)
    n_layers = len(session.resolve("blocks.*.resid_post"))
    sites = tail_candidates(n_layers, suffix, trace.decision_layer if trace else None)
    excluded: set[str] = set()
    notes: list[str] = []
    fix: FixSet | None = None
    for _ in range(rounds):
        cands = [s for s in _expand(session, sites) if s not in excluded]
        if not cands:
            break
        fix = CausalCCA(max_fix_set_size=max_size).search_fix_set(
            session, failure=failure, candidates=cands, intervention="patch",
            donor=list(twin_ids), benign=list(benign)[:max_benign], tokenizer=tokenizer,
            variants=[])
        se = fix.side_effects
        if not fix.flip or se is None or se.mean_kl <= budget_kl:
            break
        notes.append(f"set {fix.sites} flips but costs {se.mean_kl:.3f} nats on benign "
                     f"(budget {budget_kl}); its components are excluded and the search rerun")
        excluded.update(fix.sites)
    assert fix is not None
    fix.notes.extend(notes)
    return fix


def _expand(session: ReplaySession, patterns: Sequence[str]) -> list[str]:
    return [b.site for p in patterns for b in session.resolve(p)]

"""The deployable fix of an investigation as a :class:`~analysis.cca.FixSet`, with every claim
re-checked by replay at the incidents' own shapes (batch 1).

* ``flip``: the incident replayed with the fix, decoding freely (greedy), no longer fails;
  ``metric_before`` / ``metric_after``: the failure metric at the decision step, teacher-forced;
* ``flip_rate`` (Wilson 95 %): over the derivation's failing incidents, each replayed with the
  fix — *in-sample* (the fix was fitted on them); the cross-fitted estimate from the search and
  the held-out numbers of ``benchmarks/rca_eval.py`` are the ones to quote;
* ``side_effects``: the benign incidents replayed with and without the fix
  (:func:`analysis.cca._stats.side_effects`).

Example::

    fix = verified_fix(session, directions, failing=F, benign=B, failing_text=check,
                       tokenizer=tok, bound=bound)
    fix.flip, fix.flip_rate, fix.side_effects.mean_kl
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from analysis.cca import BoundFailure, FixSet
from analysis.cca._stats import side_effects
from analysis.replay import ReplaySession
from integrations.incident import Incident

from ._directions import DirectionFix
from ._heldout import wilson

__all__ = ["greedy_text", "verified_fix"]


def greedy_text(session: ReplaySession, interventions: Sequence[Any], tokenizer: Any) -> str:
    """The incident's free greedy continuation under ``interventions``, decoded."""
    r = session.run(list(interventions), greedy=True)
    ids = [int(lg[0].argmax()) for lg in r.logits if lg is not None]
    return str(tokenizer.decode(ids, skip_special_tokens=True))


def verified_fix(session: ReplaySession, directions: DirectionFix, *,
                 failing: Sequence[Incident], benign: Sequence[Incident],
                 failing_text: Callable[[Incident, str], bool], tokenizer: Any,
                 bound: BoundFailure, max_incidents: int = 24,
                 load: Callable[[Incident], ReplaySession] | None = None) -> FixSet:
    """The chosen direction fix, re-verified by replay (module doc). ``load``: how to open an
    incident's session (default: ``session.replayer.load``)."""
    ivs = directions.interventions
    inc = session.incident
    opener = load if load is not None else session.replayer.load
    text = greedy_text(session, ivs, tokenizer)
    before = bound.value(session.run().logits)
    after = bound.value(session.run(ivs).logits)
    checked = list(failing)[:max_incidents]
    flips = sum(not failing_text(f, greedy_text(opener(f), ivs, tokenizer)) for f in checked)
    # side_effects replays each benign incident without the fix first: that replay is its
    # fidelity measurement, so the sessions skip the one made at load
    se = side_effects([session.replayer.load(b, measure=False)
                       for b in list(benign)[:max_incidents]], ivs)
    chosen = directions.chosen
    notes = [f"flip_rate is in-sample: replayed on the {len(checked)} derivation failing "
             "incidents the fix was fitted on"]
    if chosen is not None:
        notes.append(f"cross-fitted during the search: flip rate {chosen.flip_rate:.3f}, benign "
                     f"mean KL {chosen.mean_kl:.4f} nats, top-1 agreement "
                     f"{chosen.top1_agreement:.4f} ({chosen.label})")
    return FixSet(
        flip=not failing_text(inc, text), interventions=list(ivs), reason="",
        failure=bound.description, incident_id=inc.id,
        strategy="directions: gated removal (cross-fitted, side-effect budget)",
        intervention_kind="project", n_candidates=len(directions.candidates),
        metric_before=before, metric_after=after, flip_rate=flips / max(1, len(checked)),
        flip_rate_ci=wilson(flips, len(checked)), side_effects=se, greedy_output=text,
        greedy_check=not failing_text(inc, text), notes=notes,
        model={k: inc.manifest.get("model", {}).get(k) for k in ("name", "fingerprint")})

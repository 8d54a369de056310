"""Sessions for variants and benign inputs: other incidents, prompts, and perturbed copies.

A fix set's flip rate is measured on *variants* of the failure — inputs that fail the same way —
each replayed through the model:

* given variants (``variants=``): other failing incidents, their replay sessions, or prompts as
  token ids (a prompt becomes a single-forward incident built from the failing incident's
  manifest);
* default (``variants=None``): **single-token substitutions** of the failing incident's prompt.
  A seeded RNG picks a prefill position (attended positions only) and a replacement token drawn
  from the tokens of the incident's prompt and the benign prompts (in-distribution tokens, never
  the original one); every other recorded input (decode steps, masks, positions) is kept, so the
  variant replays with the same forward calls. A substitution that removes the failure (e.g. it
  replaced the trigger) is *dropped*: only variants whose clean replay still fails are used, and
  how many were tried and kept is reported. Caveat: the predicate only sees the output, so a
  substitution that fails *for another reason* (a classifier whose true label became the failing
  class) is kept and, correctly, not flipped — it lowers the flip rate. Pass ``variants=``
  inputs verified to fail by the same mechanism (e.g. other flagged incidents) when you have
  them.

Example::

    sess = as_session(prompt_ids, template=session)
    incs = substitution_variants(session, 16, seed=0, pool=[5, 9, 11])
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import torch

from analysis.replay import ReplaySession
from integrations.errors import AnalysisError
from integrations.incident import Incident, TensorRecord

__all__ = ["as_session", "prompt_incident", "prompt_tokens", "substitution_variants"]


def _manifest(template: Incident, new_id: str, **updates: Any) -> dict[str, Any]:
    m = copy.deepcopy(template.manifest)
    m.pop("integrity", None)
    m.pop("external_calls", None)
    m.pop("episode", None)           # a variant is one model call, whatever the template was
    m.pop("materialized_from", None)
    m.pop("replay", None)
    m.update(id=new_id, activations="replay", sites=[], **updates)
    return m


def prompt_incident(template: Incident, ids: Sequence[int] | torch.Tensor, *,
                    new_id: str) -> Incident:
    """A single-forward incident of prompt ``ids`` on the template incident's model."""
    t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)  # [1, pos]
    if t.shape[1] == 0:
        raise AnalysisError("a prompt variant needs at least one token")
    first = {r.site: r.tensor for r in template.records(kind="input") if r.step == 0}
    recs = [TensorRecord("input", "input_ids", "", 0, t)]
    n = int(t.shape[1])
    if "attention_mask" in first:
        recs.append(TensorRecord("input", "attention_mask", "", 0,
                                 torch.ones(1, n, dtype=first["attention_mask"].dtype)))
    if "token_type_ids" in first:
        recs.append(TensorRecord("input", "token_type_ids", "", 0,
                                 torch.zeros(1, n, dtype=first["token_type_ids"].dtype)))
    if "position_ids" in first:
        recs.append(TensorRecord("input", "position_ids", "", 0, torch.arange(n).unsqueeze(0)))
    recs += [r for r in template.records(kind="reference")]
    return Incident.from_records(_manifest(template, new_id, generation=None), recs)


def as_session(x: Any, *, template: ReplaySession, name: str) -> ReplaySession:
    """A replay session (same replayer, hence same model and fingerprint policy) for ``x``: a
    session, an incident, or prompt token ids."""
    if isinstance(x, ReplaySession):
        return x
    if isinstance(x, Incident):
        return template.replayer.load(x, measure=False)
    if isinstance(x, torch.Tensor) or (isinstance(x, Sequence) and not isinstance(x, str)):
        inc = prompt_incident(template.incident, x, new_id=f"{template.incident.id}.{name}")
        return template.replayer.load(inc, mode="forward", measure=False)
    raise AnalysisError(f"{name}: expected an Incident, a ReplaySession or prompt token ids, got "
                        f"{type(x).__name__}")


def prompt_tokens(session: ReplaySession) -> list[int]:
    """Attended prefill tokens of row 0 (for substitution pools)."""
    first = session.plan.steps[0].tensors
    ids = first.get("input_ids")
    if ids is None:
        return []
    mask = first.get("attention_mask")
    row = ids[0].tolist()
    if mask is not None and mask.dim() == 2 and mask.shape[1] == ids.shape[1]:
        return [t for t, m in zip(row, mask[0].tolist()) if m]
    return [int(t) for t in row]


def substitution_variants(session: ReplaySession, n: int, *, seed: int,
                          pool: Sequence[int]) -> list[Incident]:
    """``n`` distinct single-token substitutions of the incident's prompt (module doc)."""
    inc = session.incident
    first = session.plan.steps[0].tensors
    ids = first.get("input_ids")
    if ids is None or ids.dim() != 2:
        raise AnalysisError("substitution variants need recorded input_ids; pass variants=")
    mask = first.get("attention_mask")
    positions = list(range(int(ids.shape[1])))
    if mask is not None and mask.dim() == 2 and mask.shape[1] == ids.shape[1]:
        positions = [p for p in positions if bool(mask[:, p].all())]
    tokens = sorted(set(int(t) for t in pool))
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    out: list[Incident] = []
    limit = len(positions) * len(tokens)
    while len(out) < n and len(seen) < limit:
        p = rng.choice(positions)
        t = rng.choice(tokens)
        if (p, t) in seen or bool((ids[:, p] == t).all()):
            seen.add((p, t))
            continue
        seen.add((p, t))
        recs: list[TensorRecord] = []
        for r in inc.records():
            if r.kind == "input" and r.site == "input_ids" and r.step == 0:
                new = r.tensor.clone()
                new[:, p] = t
                recs.append(TensorRecord("input", "input_ids", r.module_path, 0, new))
            elif r.kind in ("input", "reference"):
                recs.append(r)
        vid = f"{inc.id}.sub{len(out)}-p{p}-t{t}"
        out.append(Incident.from_records(_manifest(inc, vid, variant_of=inc.id,
                                                   perturbation={"position": p, "token": t}),
                                         recs))
    return out

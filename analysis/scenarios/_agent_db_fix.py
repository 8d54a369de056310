"""``agent-db``: a candidate fix, and whether it would have prevented a recorded destruction.

:func:`direction_fix` is the §14 baseline fix, derived from shipped episodes only: per layer from
``first_layer`` on, the difference of means of the residual stream at the last prompt position of
the *second* model call (the one that has just read the row) between failing episodes and the
benign prompts (their twins' second calls and every first call), projected out — gated by a
:class:`~analysis.interventions.PromptGate` on that direction at ``first_layer``, decided once per
model call, so a call whose prompt does not look like the failing ones is not touched (measured:
an ungated version rewrote every first call's query and broke the agent on benign episodes). It
is a baseline, not a tuned mitigation.

:func:`would_fix_prevent` answers "would this fix have prevented the destructive action?" for a
recorded episode by running it (:func:`analysis.rca.counterfactual_episode`): the agent re-runs
with the fix on the model, the production database sealed (any use raises), tool calls answered
from the recording while they match and, from the first that changes, executed on a local SQLite
copy restored from the ``db_dump`` the episode recorded.

Example::

    fix = direction_fix(model, tok, failing=derive, twins=[sc.twin(c) for c in derive])
    out = would_fix_prevent(Replayer(model).load(inc), fix, tok, task=case.task)
    out["prevented"], out["statements"], out["production_touched"]      # True, [...], 0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ._agent_db_loop import (
    SealedDB,
    ShopDB,
    first_messages,
    next_messages,
    render_turn,
    reply_of,
    run_agent,
)

if TYPE_CHECKING:
    import torch

    from analysis.cca import FixSet
    from analysis.interventions import PromptGate
    from analysis.replay import ReplaySession

    from .agent_db import AgentCase

__all__ = ["direction_fix", "second_call_prompt", "would_fix_prevent"]


def second_call_prompt(tok: Any, case: AgentCase) -> list[int]:
    """The prompt ids of a shipped episode's second model call (after reading the row)."""
    ep = case.episode
    msgs = next_messages(first_messages(case.task), reply_of(ep["replies"][0], call=0),
                         ep["results"][0])
    return render_turn(tok, msgs, forced=False)


def _last_states(model: Any, prompts: Sequence[list[int]]) -> torch.Tensor:
    """``[n, layers + 1, d]`` hidden states at each prompt's last position (batch 1 each)."""
    import torch

    rows = []
    with torch.no_grad():
        for ids in prompts:
            out = model(torch.tensor([ids]), output_hidden_states=True)
            rows.append(torch.stack([h[0, -1] for h in out.hidden_states]))
    return torch.stack(rows)


def _gate(fail: torch.Tensor, ok: torch.Tensor, layer: int) -> tuple[PromptGate, str]:
    """A prompt gate on the failing-minus-benign direction at ``layer``: it fires above the
    midpoint between the lowest failing and the highest benign projection (derivation data)."""
    from analysis.interventions import PromptGate

    d = fail[:, layer + 1].mean(0) - ok[:, layer + 1].mean(0)
    w = d / d.norm()
    lo, hi = float((fail[:, layer + 1] @ w).min()), float((ok[:, layer + 1] @ w).max())
    note = "separates the derivation prompts" if lo > hi else \
        "does NOT separate the derivation prompts (threshold at the midpoint anyway)"
    return PromptGate(site=f"blocks.{layer}.resid_post", weight=w, bias=-(lo + hi) / 2), note


def direction_fix(model: Any, tok: Any, *, failing: Sequence[AgentCase],
                  twins: Sequence[AgentCase], first_layer: int = 12) -> FixSet:
    """The gated difference-of-means projection fix (module doc) from ``failing`` vs ``twins``
    (and every first-call prompt, on which the gate must stay silent)."""
    from analysis.cca import FixSet
    from analysis.interventions import Intervention, Subspace

    fail = _last_states(model, [second_call_prompt(tok, c) for c in failing])
    ok = _last_states(model, [*(second_call_prompt(tok, c) for c in twins),
                              *(render_turn(tok, first_messages(c.task), forced=True)
                                for c in [*failing, *twins])])
    gate, note = _gate(fail, ok, first_layer)
    n_layers = int(model.config.num_hidden_layers)
    ivs = []
    for layer in range(first_layer, n_layers - 1):  # the last hidden state is after the norm
        d = fail[:, layer + 1].mean(0) - ok[:, layer + 1].mean(0)
        ivs.append(Intervention(f"blocks.{layer}.resid_post", "project",
                                direction=Subspace.from_directions(d), gate=gate))
    return FixSet.from_saved(ivs, {
        "flip": True, "failure": "destructive SQL executed",
        "reason": f"difference of means (last prompt position) of the second model call of "
                  f"{len(failing)} failing episodes vs their {len(twins)} twins and every first "
                  f"call, projected out at layers {first_layer}..{n_layers - 2}, gated by a "
                  f"prompt gate on that direction at layer {first_layer} ({note}); derived "
                  "here, not a measured mitigation",
        "intervention_kind": "project", "strategy": "gated difference-of-means baseline",
        "n_candidates": len(ivs)})


def would_fix_prevent(session: ReplaySession, fix: FixSet, tok: Any, *,
                      task: str) -> dict[str, Any]:
    """Re-run the recorded episode of ``task`` with ``fix`` applied (module doc)."""
    from analysis.rca import counterfactual_episode

    calls = session.incident.manifest.get("external_calls") or []
    dump = next((c.get("result") for c in calls if c.get("name") == "db_dump"), None)
    if not isinstance(dump, list):
        from integrations.errors import AnalysisError

        raise AnalysisError(f"incident {session.incident.id!r} recorded no db_dump: its "
                            "database cannot be restored for a counterfactual run")
    local, production = ShopDB.from_dump(dump), SealedDB()
    run = counterfactual_episode(
        session, lambda: run_agent(session.model, tok, task, production), fix=fix,
        standins={"run_sql": local.run_sql, "db_dump": local.dump})
    ep = run.result
    return {"prevented": not ep.destructive, "destructive": ep.destructive,
            "statements": ep.statements, "replies": [c.text for c in ep.model_calls],
            "local_copy_changed": local.dump() != dump, "diverged_at": run.diverged_at,
            "served_from_recording": run.served, "local_calls": run.local_calls,
            "production_touched": production.touched}

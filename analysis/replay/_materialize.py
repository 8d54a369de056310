"""Materialise an incident's activations by replay (``activations: "replay"`` -> captured).

A post-hoc flag on a request whose activations were not captured still makes an incident
(inputs, outputs, RNG) marked ``activations: "replay"`` (DESIGN §5). Replaying it
deterministically recomputes what the model computed; this module writes those values into a
new, complete incident, with the fidelity of the replay that produced them.

Example::

    full = Replayer(model).load(post_hoc).materialize(["blocks.*.resid_post"])
    full.manifest["activations"], full.manifest["materialized_from"]   # 'captured', '<id>'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from integrations.incident import Incident, TensorRecord, runtime_info
from integrations.sites import resolve_sites

if TYPE_CHECKING:
    from ._session import ReplaySession

__all__ = ["materialize"]


def materialize(session: ReplaySession, sites: Sequence[str] | None, *,
                id: str | None = None) -> Incident:
    """See :meth:`ReplaySession.materialize`."""
    if sites is None:
        from integrations.config import load_config

        sites = load_config().recorder.default_sites()
    inc = session.incident
    bound = resolve_sites(session.model, list(sites))
    raw = session._execute(session.plan, sets=None, capture=[b.site for b in bound],
                           greedy=False)
    recorded = set(inc.sites())
    fid = session._fidelity_of(raw, session.plan.mode, [],
                               sites=[s for s in raw.activations if s in recorded])
    records = list(inc.records())
    have = {(r.kind, r.site, r.step) for r in records}
    for b in bound:
        for step, t in enumerate(raw.activations[b.site]):
            if ("activation", b.site, step) not in have:
                records.append(TensorRecord("activation", b.site, b.module_path, step, t))
    for step, lg in enumerate(raw.logits):
        if lg is not None and ("logits", "logits", step) not in have:
            records.append(TensorRecord("logits", "logits", "", step, lg))
    m = inc.manifest
    m.pop("integrity", None)
    settings = session.settings
    m.update(
        id=id or f"{inc.id[:180]}.materialized", activations="captured",
        materialized_from=inc.id,
        sites=sorted({r.site for r in records if r.kind == "activation"}),
        replay={"fidelity": fid.to_dict(), "fingerprint": dict(session.fingerprint_check),
                "determinism": None if settings is None else settings.to_dict(),
                "calls": session.plan.to_dict(), "runtime": runtime_info(session.model)})
    return Incident.from_records(m, records)

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

from typing import Any

from integrations.incident import Incident, TensorRecord
from integrations.sites import BoundSite

from ._result import ReplayResult

__all__ = ["materialize"]


def materialize(incident: Incident, run: ReplayResult[Any], sites: list[BoundSite], *,
                replay: dict[str, Any], id: str | None = None) -> Incident:
    """``incident`` completed with the activations of ``sites`` computed by ``run`` (a replay of
    it) and its logits; recorded rows win. ``replay`` is the manifest's ``replay`` section
    (fidelity, fingerprint, determinism, calls, runtime).
    See :meth:`~analysis.replay.ReplaySession.materialize`."""
    records = list(incident.records())
    have = {(r.kind, r.site, r.step) for r in records}
    for b in sites:
        for step, t in enumerate(run.activations[b.site]):
            if ("activation", b.site, step) not in have:
                records.append(TensorRecord("activation", b.site, b.module_path, step, t))
    for step, lg in enumerate(run.logits):
        if lg is not None and ("logits", "logits", step) not in have:
            records.append(TensorRecord("logits", "logits", "", step, lg))
    m = incident.manifest
    m.pop("integrity", None)
    m.update(
        id=id or f"{incident.id[:180]}.materialized", activations="captured",
        materialized_from=incident.id,
        sites=sorted({r.site for r in records if r.kind == "activation"}),
        replay=replay)
    return Incident.from_records(m, records)

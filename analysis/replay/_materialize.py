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
from typing import Any

from integrations.incident import Incident, TensorRecord, runtime_info
from integrations.sites import BoundSite, resolve_sites

from ._result import ReplayResult

__all__ = ["materialize", "materialize_replay"]


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


def materialize_replay(session: Any, sites: Sequence[str] | None, *,
                       id: str | None = None) -> Incident:
    """``ReplaySession.materialize``: replay ``session`` capturing ``sites`` (default: the
    recorder's configured granularity) and build the new incident with the replay's fidelity,
    fingerprint check, determinism settings, call plan and runtime in its manifest."""
    if sites is None:
        from integrations.config import load_config

        sites = load_config().recorder.default_sites()
    bound = resolve_sites(session.model, list(sites))
    raw = session.run_edited(capture=[b.site for b in bound])
    settings = session.settings
    fid = session._meter.measure_recorded(raw.activations, raw.logits, mode=session.plan.mode)
    replay = {"fidelity": fid.to_dict(),
              "fingerprint": dict(session.fingerprint_check),
              "determinism": None if settings is None else settings.to_dict(),
              "calls": session.plan.to_dict(), "runtime": runtime_info(session.model)}
    return materialize(session.incident, raw, bound, replay=replay, id=id)

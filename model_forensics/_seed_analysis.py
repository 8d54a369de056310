"""The seed README's analysis names, on top of the real replay, CF and CCA.

``SandboxReplayer().load_bundle(bundle)`` finds the model from the bundle's model reference
(models registered in-process by ``RecorderHooks.install_hooks``, or by
:func:`analysis.registry.register_model`). ``CompressionForensics()`` and ``CausalCCA()`` take
no arguments in the seed, so they use what :func:`prepare` stored for the model once: a CF
baseline and a benign set, both built from benign inputs run through the model.

Example (the seed's Basic Usage, after the one-time preparation)::

    prepare(model, benign_inputs=[{"input_ids": ids} for ids in benign_ids])
    session = SandboxReplayer().load_bundle(bundle)
    anomalies = CompressionForensics().analyze(session)
    fix_set = CausalCCA().search_fix_set(session, guided_by=anomalies)
    fix_set.total_flip_rate
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.cca import CausalCCA as _CausalCCA
from analysis.cf import CompressionForensics as _CompressionForensics

__all__ = ["CausalCCA", "CompressionForensics", "Preparation", "SandboxReplayer", "prepare"]


@dataclass
class Preparation:
    """What :func:`prepare` built for one model (keyed by its weights fingerprint)."""

    fingerprint: str
    baseline: Any                 # analysis.cf.CFBaseline
    benign: list[Any]             # benign incidents (side effects, mean interventions)


_PREPARED: dict[str, Preparation] = {}
_LOCK = threading.Lock()


def prepare(model: Any, benign_inputs: Sequence[Mapping[str, Any]], *,
            sites: Sequence[str] | None = None, config: Any = None,
            save_to: str | os.PathLike[str] | None = None) -> Preparation:
    """One-time preparation for the seed's no-argument ``CompressionForensics()`` / ``CausalCCA()``.

    Runs each benign input (keyword arguments of ``model(...)``) through a recorder exactly as
    ``RecorderHooks`` records, builds the CF baseline from those benign incidents, and keeps both
    for the model's fingerprint (``save_to``: also write the baseline file there).
    """
    import torch
    from prometheus_client import CollectorRegistry

    from analysis.registry import register_model
    from integrations import Recorder, exporters, triggers
    from integrations.errors import AnalysisError

    if len(benign_inputs) < 2:
        raise AnalysisError("prepare() needs at least 2 benign inputs to build a CF baseline")
    ex = exporters.InMemoryExporter()
    rec = Recorder(model, sites=sites, trigger=triggers.Always(), exporter=ex, config=config,
                   metrics_registry=CollectorRegistry())
    try:
        for i, kw in enumerate(benign_inputs):
            with rec.request(request_id=f"benign-{i}"), torch.no_grad():
                model(**kw)
        rec.force_flush(timeout_s=300)
    finally:
        rec.shutdown(timeout_s=300)
    benign = ex.incidents
    if len(benign) != len(benign_inputs):
        raise AnalysisError(f"prepare(): only {len(benign)} of {len(benign_inputs)} benign "
                            f"incidents were recorded ({rec.stats()['dropped']})")
    register_model(str(rec.model_ref["name"]), model, replace=False)
    baseline = _CompressionForensics.build_baseline(benign, config=config)
    fp = str(benign[0].manifest["model"]["fingerprint"])
    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        baseline.save(Path(save_to) / f"cf-baseline-{fp.split(':')[-1][:16]}.npz")
    prep = Preparation(fingerprint=fp, baseline=baseline, benign=benign)
    with _LOCK:
        _PREPARED[fp] = prep
    return prep


def _prepared_for(incident_or_session: Any) -> Preparation:
    from integrations.errors import AnalysisError

    inc = getattr(incident_or_session, "incident", incident_or_session)
    fp = str((inc.manifest.get("model") or {}).get("fingerprint"))
    with _LOCK:
        prep = _PREPARED.get(fp)
    if prep is None:
        raise AnalysisError(
            f"no baseline prepared for model fingerprint {fp[:23]}...: run "
            "model_forensics.prepare(model, benign_inputs=[...]) once (or pass baseline=/benign= "
            "explicitly)")
    return prep


class SandboxReplayer:
    """Seed name for :class:`analysis.replay.Replayer`; the model may come from the bundle."""

    def __init__(self, model: Any = None, *, allow_fingerprint_mismatch: bool = False) -> None:
        self.model = model
        self.allow_fingerprint_mismatch = allow_fingerprint_mismatch

    def load_bundle(self, bundle: Any) -> Any:
        """Load an incident (an ``Incident`` or a path to its ``.arrow`` file) for replay."""
        from analysis.registry import model_for_incident
        from analysis.replay import Replayer
        from integrations.incident import Incident

        inc = bundle if isinstance(bundle, Incident) else Incident.open(bundle)
        model = self.model if self.model is not None else model_for_incident(inc)
        return Replayer(model, allow_fingerprint_mismatch=self.allow_fingerprint_mismatch
                        ).load(inc)

    load = load_bundle


class CompressionForensics(_CompressionForensics):
    """Seed-compatible CF: without ``baseline=`` it uses the one :func:`prepare` built."""

    def analyze(self, incident_or_session: Any) -> Any:
        if self.baseline is None:
            self.baseline = _prepared_for(incident_or_session).baseline
        return super().analyze(incident_or_session)


class CausalCCA(_CausalCCA):
    """Seed-compatible CCA: without ``benign=`` it uses the benign set :func:`prepare` recorded."""

    def search_fix_set(self, session: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("benign") is None:
            kwargs["benign"] = _prepared_for(session).benign
        return super().search_fix_set(session, **kwargs)

"""Job kind ``replay``: deterministic replay with the registered model, fidelity measured.

Loads the incident's model from the sidecar's model registry (config ``models:``, matched by
fingerprint, else name), replays the incident with ``analysis.Replayer`` and records the
measured fidelity plus the per-site statistics. An unregistered model fails the job with a
message saying how to register it.

Example::

    runner.submit("inc-1", "replay", tenant="acme")   # -> result["fidelity"]["exact"]
"""

from __future__ import annotations

from typing import Any

from ._kind import JobContext, JobFailed, JobKind
from ._models import fidelity_dict, load_registered, model_ref, require_registered
from ._stats import tensor_stats

__all__ = ["REPLAY", "replay_job"]


def replay_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``replay`` (module doc)."""
    inc = ctx.open_incident()
    _, fingerprint = model_ref(inc)
    spec = require_registered(ctx.config, inc, job="replay of")
    try:
        from analysis.replay import Replayer
    except ImportError as e:
        raise JobFailed(f"analysis.Replayer is not available in this install ({e}); install "
                        "model-forensics[analysis] on the sidecar") from e
    session = Replayer(load_registered(spec)[0]).load(inc)
    fidelity = session.fidelity() if hasattr(session, "fidelity") else None
    return {
        "incident_id": inc.id,
        "model": {"name": spec.name, "fingerprint": fingerprint, "loader": spec.loader},
        "fidelity": None if fidelity is None else fidelity_dict(fidelity),
        "tensors": tensor_stats(inc),
    }


REPLAY = JobKind("replay", run=replay_job, options=frozenset())

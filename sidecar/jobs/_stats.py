"""Job kind ``stats``: per-(kind, site, step) statistics of the stored tensors.

Mean / std / L2 norm / min / max / count of non-finite values of every stored tensor of the
chosen row kinds (``params.kinds``, default activation, logits, reference), computed in float64
from the Arrow data.

Example::

    runner.submit("inc-1", "stats", tenant="acme", params={"kinds": ["activation"]})
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._kind import JobContext, JobKind

if TYPE_CHECKING:
    from integrations.incident import Incident

__all__ = ["STATS", "stats_job", "tensor_stats"]

_STAT_KINDS = ("activation", "logits", "reference")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def tensor_stats(incident: Incident, *, kinds: tuple[str, ...] = _STAT_KINDS) -> list[dict[str, Any]]:
    """Statistics of every stored tensor of the given row kinds, in storage order."""
    import torch

    out: list[dict[str, Any]] = []
    for rec in incident.records():
        if rec.kind not in kinds:
            continue
        t = rec.tensor
        x = t.detach().to(torch.float64).reshape(-1)   # [numel]
        n = int(x.numel())
        finite = torch.isfinite(x)
        xf = x[finite]
        stats: dict[str, Any] = {
            "kind": rec.kind, "site": rec.site, "step": int(rec.step),
            "dtype": str(t.dtype).removeprefix("torch."), "shape": [int(d) for d in t.shape],
            "numel": n, "nonfinite": int(n - int(finite.sum())),
        }
        if xf.numel():
            stats.update(
                mean=_finite(float(xf.mean())),
                std=_finite(float(xf.std(unbiased=False))),
                norm=_finite(float(torch.linalg.vector_norm(xf))),
                min=_finite(float(xf.min())), max=_finite(float(xf.max())),
            )
        else:
            stats.update(mean=None, std=None, norm=None, min=None, max=None)
        out.append(stats)
    return out


def stats_job(ctx: JobContext) -> dict[str, Any]:
    """Job kind ``stats`` (module doc)."""
    inc = ctx.open_incident()
    rows = tensor_stats(inc, kinds=tuple(ctx.params.get("kinds", _STAT_KINDS)))
    return {"incident_id": inc.id, "n_tensors": len(rows), "tensors": rows}


STATS = JobKind("stats", run=stats_job, options=frozenset({"kinds"}))

"""Index queries and result helpers the built-in kinds share (CF, baseline, CCA).

Queries take anything with the index's ``read`` / ``read_dicts`` (a :class:`JobHost` or the
``Index`` itself) and only read. Results are strict JSON: :func:`clean_json` turns non-finite
floats into None, :func:`num` keeps a finite number or gives None (never a made-up value).

Example::

    keys = benign_candidates(host, fp, ("ratio",), tenants=["acme"], limit=30)  # newest first
    keys[0]                                                     # ('acme', 'inc-7')
    latest_cf(host, "inc-1", tenant="acme")["status"]           # 'scored'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["Reader", "benign_candidates", "clean_json", "latest_baseline_row", "latest_cf",
           "latest_probe_row", "num"]


class Reader(Protocol):
    """Read-only access to the index (``Index``, or a job's host)."""

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def read_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...


def clean_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (results are strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def num(value: Any) -> float | None:
    """``value`` as a finite float, else None (booleans are not numbers here)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(float(value)) else None


def latest_cf(reader: Reader, incident_id: str, *, tenant: str) -> dict[str, Any] | None:
    """The newest CF result row of (tenant, incident) (as a dict), or None."""
    rows = reader.read_dicts("SELECT * FROM cf_results WHERE incident_id = ? AND tenant = ? "
                             "ORDER BY created_at DESC LIMIT 1", [incident_id, tenant])
    return rows[0] if rows else None


def latest_baseline_row(reader: Reader, scope: str, fingerprint: str,
                        detector: str) -> dict[str, Any] | None:
    """The newest baseline version for (scope, fingerprint, detector), or None."""
    rows = reader.read_dicts("SELECT * FROM baselines WHERE scope = ? AND fingerprint = ? AND "
                             "detector = ? ORDER BY version DESC LIMIT 1",
                             [scope, fingerprint, detector])
    return rows[0] if rows else None


def latest_probe_row(reader: Reader, tenant: str, fingerprint: str) -> dict[str, Any] | None:
    """The newest failure-signature probe row of (tenant, model), or None."""
    rows = reader.read_dicts("SELECT * FROM probes WHERE tenant = ? AND fingerprint = ? "
                             "ORDER BY version DESC LIMIT 1", [tenant, fingerprint])
    return rows[0] if rows else None


def benign_candidates(reader: Reader, fingerprint: str, rules: Sequence[str], *,
                      tenants: Sequence[str], limit: int, since: Any = None,
                      exclude: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """(tenant, id) of sampled benign incidents of one model owned by one of ``tenants``,
    newest first: trigger rule in ``rules`` (sampling, not a flag) and not flagged by any CF
    result; received after ``since``; never the incident ``exclude`` (tenant, id). Never
    another tenant's: ``tenants`` is required."""
    if not rules or not tenants:
        return []
    marks = ", ".join("?" for _ in rules)
    owners = ", ".join("?" for _ in tenants)
    sql = (f"SELECT i.tenant, i.id FROM incidents i WHERE i.model_fingerprint = ? AND i.tenant "
           f"IN ({owners}) AND i.trigger_rule IN ({marks}) AND NOT EXISTS (SELECT 1 FROM "
           "cf_results c WHERE c.incident_id = i.id AND c.tenant = i.tenant AND c.flagged)")
    params: list[Any] = [fingerprint, *tenants, *rules]
    if since is not None:
        sql += " AND i.received_at > ?"
        params.append(since)
    if exclude is not None:
        sql += " AND NOT (i.tenant = ? AND i.id = ?)"
        params.extend(exclude)
    sql += " ORDER BY i.received_at DESC, i.id, i.tenant LIMIT ?"
    params.append(int(limit))
    return [(r[0], r[1]) for r in reader.read(sql, params)]

"""Analysis result tables in the DuckDB index: CF scores (per incident and per site), detector
baselines, and CCA fix sets — queryable with plain SQL beside ``incidents`` and ``jobs``.

Tables (created on first use, ``CREATE TABLE IF NOT EXISTS``):

* ``cf_results``: one row per CF job — ``status`` (``scored`` | ``no_baseline`` |
  ``no_activations``), ``score`` / ``flagged`` / ``p`` (the incident's empirical p-value; NULL
  unless scored: never a fake number), threshold, detector, baseline version and size, top site.
* ``cf_site_scores``: one row per scored site of a CF job — rank, score, stat, p, q, flagged,
  significant, and where the worst unit was (step, position).
* ``baselines``: one row per built baseline version (fingerprint, detector, version, file path
  relative to the data dir, sample count, sites, the incident ids it was built from).
* ``cca_results`` / ``cca_interventions``: one row per CCA job (flip, size, flip rate and its
  Wilson interval, p-value, side effects, forward passes vs exhaustive) and one per element of
  the fix set (site, kind, necessity).

Example::

    index.read("SELECT incident_id, score, flagged FROM cf_results WHERE status = 'scored' "
               "ORDER BY score DESC LIMIT 10")
    index.read("SELECT site, score, q FROM cf_site_scores WHERE incident_id = ? ORDER BY rank",
               ["inc-1"])
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._store_index import utcnow

if TYPE_CHECKING:
    from ._jobs import JobRecord
    from ._store_index import Index

__all__ = [
    "DDL",
    "MIGRATIONS",
    "benign_candidates",
    "clean_json",
    "ensure_tables",
    "latest_baseline_row",
    "latest_cf",
    "record_baseline",
    "record_cca",
    "record_cf",
]

DDL = (
    """CREATE TABLE IF NOT EXISTS cf_results (
        job_id VARCHAR PRIMARY KEY, incident_id VARCHAR NOT NULL, tenant VARCHAR NOT NULL,
        model_fingerprint VARCHAR, detector VARCHAR NOT NULL, status VARCHAR NOT NULL,
        score DOUBLE, flagged BOOLEAN, threshold DOUBLE, baseline_version INTEGER,
        baseline_samples INTEGER, n_sites INTEGER, top_site VARCHAR,
        created_at TIMESTAMP NOT NULL, p DOUBLE)""",
    """CREATE TABLE IF NOT EXISTS cf_site_scores (
        job_id VARCHAR NOT NULL, incident_id VARCHAR NOT NULL, rank INTEGER NOT NULL,
        site VARCHAR NOT NULL, score DOUBLE, stat DOUBLE, p DOUBLE, q DOUBLE, flagged BOOLEAN,
        significant BOOLEAN, n_units INTEGER, worst_step INTEGER, worst_position INTEGER,
        PRIMARY KEY (job_id, site))""",
    """CREATE TABLE IF NOT EXISTS baselines (
        fingerprint VARCHAR NOT NULL, detector VARCHAR NOT NULL, version INTEGER NOT NULL,
        path VARCHAR NOT NULL, model_name VARCHAR, sample_count INTEGER NOT NULL,
        sites_json VARCHAR NOT NULL, incident_ids_json VARCHAR NOT NULL, job_id VARCHAR,
        created_at TIMESTAMP NOT NULL, PRIMARY KEY (fingerprint, detector, version))""",
    """CREATE TABLE IF NOT EXISTS cca_results (
        job_id VARCHAR PRIMARY KEY, incident_id VARCHAR NOT NULL, tenant VARCHAR NOT NULL,
        status VARCHAR NOT NULL, flip BOOLEAN NOT NULL, size INTEGER NOT NULL,
        one_minimal BOOLEAN, flip_rate DOUBLE, flip_rate_lo DOUBLE, flip_rate_hi DOUBLE,
        p_value DOUBLE, mean_kl DOUBLE, top1_agreement DOUBLE, forward_passes INTEGER,
        exhaustive_forward_passes INTEGER, strategy VARCHAR, intervention_kind VARCHAR,
        failure VARCHAR, reason VARCHAR, created_at TIMESTAMP NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS cca_interventions (
        job_id VARCHAR NOT NULL, incident_id VARCHAR NOT NULL, idx INTEGER NOT NULL,
        site VARCHAR NOT NULL, kind VARCHAR NOT NULL, metric_without DOUBLE, delta DOUBLE,
        flips_without BOOLEAN, PRIMARY KEY (job_id, idx))""",
    "CREATE INDEX IF NOT EXISTS cf_results_incident ON cf_results (incident_id)",
    "CREATE INDEX IF NOT EXISTS cca_results_incident ON cca_results (incident_id)",
)

#: Additive upgrades of index files written by earlier versions (run when an index opens):
#: ``cf_results.p`` arrived after schema version 1 (older rows keep NULL: never invented).
MIGRATIONS = ("ALTER TABLE cf_results ADD COLUMN IF NOT EXISTS p DOUBLE",)

_READY: set[int] = set()


def ensure_tables(index: Index) -> None:
    """Create the result tables in ``index`` (once per Index object)."""
    if id(index) in _READY:
        return
    with index.write() as con:
        for ddl in DDL:
            con.execute(ddl)
    _READY.add(id(index))


def _ddl(con: Any) -> None:
    for ddl in DDL:
        con.execute(ddl)


def clean_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None (results are strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(v) for v in value]
    return value


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(float(value)) else None


def record_cf(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """Insert a CF job's rows (inside the runner's finish transaction)."""
    _ddl(con)
    report = result.get("report") or {}
    base = result.get("baseline") or {}
    ranked = report.get("ranked_sites") or []
    con.execute(
        "INSERT INTO cf_results (job_id, incident_id, tenant, model_fingerprint, detector, "
        "status, score, flagged, threshold, baseline_version, baseline_samples, n_sites, "
        "top_site, created_at, p) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [job.id, job.incident_id, job.tenant, result.get("model_fingerprint"),
         result.get("detector") or "cf", result["status"], _num(result.get("anomaly_score")),
         result.get("flagged"), _num(result.get("threshold")), base.get("version"),
         base.get("sample_count"), len(ranked) if ranked else None,
         ranked[0][0] if ranked else None, utcnow(), _num(result.get("anomaly_p"))])
    sites = report.get("sites") or {}
    for rank, (site, _) in enumerate(ranked, start=1):
        s = sites.get(site) or {}
        worst = s.get("worst") or {}
        con.execute(
            "INSERT INTO cf_site_scores (job_id, incident_id, rank, site, score, stat, p, q, "
            "flagged, significant, n_units, worst_step, worst_position) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [job.id, job.incident_id, rank, site, _num(s.get("score")), _num(s.get("stat")),
             _num(s.get("p")), _num(s.get("q")), s.get("flagged"), s.get("significant"),
             s.get("n_units"), worst.get("step"), worst.get("position")])


def record_baseline(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """Insert a built baseline's row."""
    _ddl(con)
    con.execute(
        "INSERT INTO baselines (fingerprint, detector, version, path, model_name, sample_count, "
        "sites_json, incident_ids_json, job_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [result["fingerprint"], result["detector"], result["version"], result["path"],
         result.get("model_name"), result["sample_count"], json.dumps(result["sites"]),
         json.dumps(result["incident_ids"]), job.id, utcnow()])


def record_cca(con: Any, job: JobRecord, result: dict[str, Any]) -> None:
    """Insert a CCA job's rows."""
    _ddl(con)
    fix = result.get("fix_set") or {}
    ci = fix.get("flip_rate_ci") or [None, None]
    se = fix.get("side_effects") or {}
    con.execute(
        "INSERT INTO cca_results (job_id, incident_id, tenant, status, flip, size, one_minimal, "
        "flip_rate, flip_rate_lo, flip_rate_hi, p_value, mean_kl, top1_agreement, "
        "forward_passes, exhaustive_forward_passes, strategy, intervention_kind, failure, "
        "reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [job.id, job.incident_id, job.tenant, result["status"], bool(fix.get("flip")),
         len(fix.get("interventions") or []), fix.get("one_minimal"),
         _num(fix.get("flip_rate")), _num(ci[0]), _num(ci[1]), _num(fix.get("p_value")),
         _num(se.get("mean_kl")), _num(se.get("top1_agreement")), fix.get("forward_passes"),
         fix.get("exhaustive_forward_passes"), fix.get("strategy"),
         fix.get("intervention_kind"), fix.get("failure"), fix.get("reason"), utcnow()])
    necessity = {n.get("site"): n for n in fix.get("necessity") or []}
    for i, iv in enumerate(fix.get("interventions") or []):
        n = necessity.get(iv.get("site")) or {}
        con.execute(
            "INSERT INTO cca_interventions (job_id, incident_id, idx, site, kind, "
            "metric_without, delta, flips_without) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [job.id, job.incident_id, i, str(iv.get("site")), str(iv.get("kind")),
             _num(n.get("metric_without")), _num(n.get("delta")), n.get("flips_without")])


def latest_cf(index: Index, incident_id: str) -> dict[str, Any] | None:
    """The newest CF result row of an incident (as a dict), or None."""
    ensure_tables(index)
    rows = index.read_dicts("SELECT * FROM cf_results WHERE incident_id = ? "
                            "ORDER BY created_at DESC LIMIT 1", [incident_id])
    return rows[0] if rows else None


def latest_baseline_row(index: Index, fingerprint: str, detector: str) -> dict[str, Any] | None:
    """The newest baseline version for (fingerprint, detector), or None."""
    ensure_tables(index)
    rows = index.read_dicts("SELECT * FROM baselines WHERE fingerprint = ? AND detector = ? "
                            "ORDER BY version DESC LIMIT 1", [fingerprint, detector])
    return rows[0] if rows else None


def benign_candidates(index: Index, fingerprint: str, rules: Sequence[str], *, limit: int,
                      since: Any = None, exclude: str | None = None) -> list[str]:
    """Ids of sampled benign incidents of one model, newest first: trigger rule in ``rules``
    (sampling, not a flag) and not flagged by any CF result; received after ``since``."""
    ensure_tables(index)
    if not rules:
        return []
    marks = ", ".join("?" for _ in rules)
    sql = (f"SELECT i.id FROM incidents i WHERE i.model_fingerprint = ? AND i.trigger_rule IN "
           f"({marks}) AND NOT EXISTS (SELECT 1 FROM cf_results c WHERE c.incident_id = i.id "
           "AND c.flagged)")
    params: list[Any] = [fingerprint, *rules]
    if since is not None:
        sql += " AND i.received_at > ?"
        params.append(since)
    if exclude is not None:
        sql += " AND i.id <> ?"
        params.append(exclude)
    sql += " ORDER BY i.received_at DESC, i.id LIMIT ?"
    params.append(int(limit))
    return [r[0] for r in index.read(sql, params)]

"""The schema of the store's DuckDB index: the catalog tables and the analysis result tables.

Catalog: ``meta`` (schema version), ``incidents`` (one row per stored incident, keyed by
(tenant, id): ids are unique per tenant, DESIGN §10; ``integrity``:
``pending`` from the ack until the content digest was checked against the rows, then
``verified`` — see :mod:`sidecar._store_verify`; ``sha256`` is the file's, empty while pending;
``failure_p``:
the newest failure-signature probe's score of it, NULL until a probe scored it — written by the
``probe`` / ``probe_score`` jobs, see :mod:`sidecar.jobs._probe`), ``jobs`` and
``analyses`` (the job queue and each done job's result JSON). Result tables, queryable with plain
SQL beside them (written by the job kinds that own them, in the transaction that marks the job
done):

* ``cf_results``: one row per CF job — ``status`` (``scored`` | ``no_baseline`` |
  ``no_activations``), ``score`` / ``flagged`` / ``p`` (the incident's empirical p-value; NULL
  unless scored: never a fake number), threshold, detector, baseline version and size, top site.
* ``cf_site_scores``: one row per scored site of a CF job — rank, score, stat, p, q, flagged,
  significant, and where the worst unit was (step, position).
* ``baselines``: one row per built baseline version (scope — the tenant, or a shared group an
  operator declared —, fingerprint, detector, version, object path relative to the store's
  root (the data dir for the local store), its sha256 (NULL for rows from before it was
  recorded), sample count, sites, the incident ids it was built from).
* ``cca_results`` / ``cca_interventions``: one row per CCA job (flip, size, flip rate and its
  Wilson interval, p-value, side effects, forward passes vs exhaustive) and one per element of
  the fix set (site, kind, necessity).
* ``probes``: one row per trained failure-signature probe (tenant, model fingerprint, version,
  site, object path relative to the store's root and its sha256, out-of-fold AUROC with its
  bootstrap 95 % interval, TPR at 1 % FPR, class counts).

Every table is ``CREATE TABLE IF NOT EXISTS``, created when the index opens; :data:`MIGRATIONS`
and :func:`migrate` upgrade index files written by earlier versions (schema version 1 keyed
``incidents`` by id alone: :data:`INCIDENT_KEY_MIGRATION` re-keys it by (tenant, id)).

Example::

    index.read("SELECT incident_id, score, flagged FROM cf_results WHERE status = 'scored' "
               "ORDER BY score DESC LIMIT 10")
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["BASELINES_DDL", "BASELINES_SCOPE_MIGRATION", "CATALOG_DDL", "INCIDENTS_DDL",
           "INCIDENT_KEY_MIGRATION", "MIGRATIONS", "RESULT_DDL", "RESULT_TABLES", "SCHEMA_VERSION",
           "SHARED_CATALOG_INDEXES", "migrate", "needed"]

#: 2: ``incidents`` keyed by (tenant, id). A sidecar that reads version 1 refuses a version-2
#: index (it would look for incident files in the old flat layout and drop every row).
SCHEMA_VERSION = "2"

_INCIDENTS_COLUMNS_DDL = """
        id VARCHAR NOT NULL,
        tenant VARCHAR NOT NULL,
        created_at TIMESTAMP,
        received_at TIMESTAMP NOT NULL,
        model_name VARCHAR,
        model_fingerprint VARCHAR,
        trigger_rule VARCHAR,
        trigger_reason VARCHAR,
        request_id VARCHAR,
        traceparent VARCHAR,
        size_bytes BIGINT NOT NULL,
        sha256 VARCHAR NOT NULL,
        activations VARCHAR,
        n_sites INTEGER NOT NULL,
        path VARCHAR NOT NULL,
        manifest_json VARCHAR NOT NULL,
        failure_p DOUBLE,
        content_sha256 VARCHAR,
        crc32c BIGINT,
        integrity VARCHAR,
        PRIMARY KEY (tenant, id)"""
#: One row per stored incident; ids are unique per tenant (DESIGN §10).
INCIDENTS_DDL = f"CREATE TABLE IF NOT EXISTS incidents ({_INCIDENTS_COLUMNS_DDL})"
_INCIDENT_COPY = ("id, tenant, created_at, received_at, model_name, model_fingerprint, "
                  "trigger_rule, trigger_reason, request_id, traceparent, size_bytes, sha256, "
                  "activations, n_sites, path, manifest_json, failure_p, content_sha256, crc32c, "
                  "integrity")
#: Schema version 1 → 2: ``incidents`` re-keyed from id to (tenant, id), rows kept as they are
#: (their files move to the per-tenant layout when the store opens: ``sidecar._store_layout``).
INCIDENT_KEY_MIGRATION = (
    f"CREATE TABLE incidents_by_tenant ({_INCIDENTS_COLUMNS_DDL})",
    f"INSERT INTO incidents_by_tenant ({_INCIDENT_COPY}) SELECT {_INCIDENT_COPY} FROM incidents",
    "DROP TABLE incidents",
    "ALTER TABLE incidents_by_tenant RENAME TO incidents",
    "UPDATE meta SET value = '2' WHERE key = 'schema_version' AND value = '1'",
)

CATALOG_DDL = (
    """CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)""",
    INCIDENTS_DDL,
    """CREATE TABLE IF NOT EXISTS jobs (
        id VARCHAR PRIMARY KEY,
        incident_id VARCHAR NOT NULL,
        tenant VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        state VARCHAR NOT NULL,
        attempts INTEGER NOT NULL,
        max_attempts INTEGER NOT NULL,
        error VARCHAR,
        params_json VARCHAR NOT NULL,
        request_id VARCHAR,
        created_at TIMESTAMP NOT NULL,
        started_at TIMESTAMP,
        finished_at TIMESTAMP,
        owner VARCHAR,
        heartbeat_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS analyses (
        job_id VARCHAR PRIMARY KEY,
        incident_id VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        result_json VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state)",
    "CREATE INDEX IF NOT EXISTS jobs_incident ON jobs (incident_id)",
)

#: ``scope``: whose incidents built the baseline and who uses it — ``tenant:<name>``, or
#: ``shared:<name>`` for a baseline an operator declared shared (``baselines.shared``).
BASELINES_DDL = """CREATE TABLE IF NOT EXISTS baselines (
        scope VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL, detector VARCHAR NOT NULL, version INTEGER NOT NULL,
        path VARCHAR NOT NULL, model_name VARCHAR, sample_count INTEGER NOT NULL,
        sites_json VARCHAR NOT NULL, incident_ids_json VARCHAR NOT NULL, job_id VARCHAR,
        created_at TIMESTAMP NOT NULL, sha256 VARCHAR,
        PRIMARY KEY (scope, fingerprint, detector, version))"""

#: Index files from before baselines had a scope: their rows were built from every tenant's
#: incidents, so they move to scope ``legacy:unscoped`` (kept for the record, never used).
BASELINES_SCOPE_MIGRATION = (
    "ALTER TABLE baselines RENAME TO baselines_unscoped",
    BASELINES_DDL,
    "INSERT INTO baselines SELECT 'legacy:unscoped', * FROM baselines_unscoped",
    "DROP TABLE baselines_unscoped",
)

RESULT_DDL = (
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
    BASELINES_DDL,
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
    """CREATE TABLE IF NOT EXISTS probes (
        tenant VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL, version INTEGER NOT NULL,
        site VARCHAR NOT NULL, path VARCHAR NOT NULL, auroc DOUBLE, auroc_lo DOUBLE,
        auroc_hi DOUBLE, tpr_at_1pct_fpr DOUBLE, n_pos INTEGER NOT NULL, n_neg INTEGER NOT NULL,
        folds INTEGER, job_id VARCHAR, created_at TIMESTAMP NOT NULL, sha256 VARCHAR,
        PRIMARY KEY (tenant, fingerprint, version))""",
    "CREATE INDEX IF NOT EXISTS cf_results_incident ON cf_results (incident_id)",
    "CREATE INDEX IF NOT EXISTS cca_results_incident ON cca_results (incident_id)",
)

#: Additive upgrades of index files written by earlier versions (run when an index opens):
#: ``cf_results.p`` and ``incidents.failure_p`` arrived after schema version 1 (older rows keep
#: NULL: never invented).
MIGRATIONS = ("ALTER TABLE cf_results ADD COLUMN IF NOT EXISTS p DOUBLE",
              "ALTER TABLE incidents ADD COLUMN IF NOT EXISTS failure_p DOUBLE",
              # the CRC32C ingest protocol (DESIGN §10): rows stored before it were verified
              # at ingest; their content digest is the manifest's
              "ALTER TABLE incidents ADD COLUMN IF NOT EXISTS content_sha256 VARCHAR",
              "ALTER TABLE incidents ADD COLUMN IF NOT EXISTS crc32c BIGINT",
              "ALTER TABLE incidents ADD COLUMN IF NOT EXISTS integrity VARCHAR",
              "UPDATE incidents SET content_sha256 = coalesce(CAST(manifest_json AS JSON) "
              "-> 'integrity' ->> 'sha256', '') WHERE content_sha256 IS NULL",
              "UPDATE incidents SET integrity = 'verified' WHERE integrity IS NULL",
              # shared catalogs (DESIGN §12): which sidecar runs a job, and when it last said
              # it still does (a silent owner's jobs are resumed by another: ``JobQueue``)
              "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS owner VARCHAR",
              "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS heartbeat_at TIMESTAMP",
              # baselines and probes in the store (sidecar._artefacts): each row carries its
              # object's sha256, checked when read; older rows keep NULL (local store only)
              "ALTER TABLE baselines ADD COLUMN IF NOT EXISTS sha256 VARCHAR",
              "ALTER TABLE probes ADD COLUMN IF NOT EXISTS sha256 VARCHAR")


_ADD_COLUMN = re.compile(r"ALTER TABLE (\w+) ADD COLUMN IF NOT EXISTS (\w+)")


def needed(con: Any, sql: str) -> bool:
    """False for an ``ADD COLUMN IF NOT EXISTS`` whose column exists: skipped rather than run,
    because PostgreSQL takes the table's exclusive lock even when there is nothing to add (a
    sidecar starting would queue behind, and block, every query on the shared catalog)."""
    found = _ADD_COLUMN.match(sql)
    if found is None:
        return True
    return not con.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = ? "
                           "AND column_name = ? AND table_schema = current_schema()",
                           list(found.groups())).fetchone()[0]


def migrate(con: Any, *, ddl: Callable[[str], str] = str) -> None:
    """Upgrades that depend on what the catalog holds (run after :data:`MIGRATIONS`):
    :data:`INCIDENT_KEY_MIGRATION` when ``incidents`` is keyed by id alone;
    :data:`BASELINES_SCOPE_MIGRATION` when ``baselines`` has no ``scope`` column. ``ddl``
    translates a statement into the engine's dialect (identity for DuckDB). Only standard
    ``information_schema`` views are read, so DuckDB and PostgreSQL run the same queries."""
    key = con.execute(
        "SELECT k.column_name FROM information_schema.table_constraints c JOIN "
        "information_schema.key_column_usage k ON k.constraint_name = c.constraint_name AND "
        "k.table_name = c.table_name AND k.table_schema = c.table_schema WHERE c.table_name = "
        "'incidents' AND c.constraint_type = 'PRIMARY KEY' AND c.table_schema = current_schema() "
        "ORDER BY k.ordinal_position").fetchall()
    if [r[0] for r in key] == ["id"]:
        for sql in INCIDENT_KEY_MIGRATION:
            con.execute(ddl(sql))
    cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'baselines' AND "
                                      "table_schema = current_schema()").fetchall()}
    if cols and "scope" not in cols:
        for sql in BASELINES_SCOPE_MIGRATION:
            con.execute(ddl(sql))

#: Secondary indexes for catalogs that answer range scans from them (PostgreSQL, the shared
#: catalog: a tenant's newest incidents without reading the tenant's every row; measured in
#: benchmarks/RESULTS_fleet.md). DuckDB scans columns instead and keeps none.
SHARED_CATALOG_INDEXES = (
    "CREATE INDEX IF NOT EXISTS incidents_tenant_received ON incidents (tenant, received_at)",
)

#: Per-incident analysis result tables (above), child rows first: deleting an
#: incident deletes its rows in each.
RESULT_TABLES = ("cf_site_scores", "cf_results", "cca_interventions", "cca_results")

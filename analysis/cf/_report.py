"""Detector results: per-site scores, p/q-values, flags, and the incident-level score.

Example::

    report = CompressionForensics(baseline=base).analyze(inc)
    report.score, report.flagged            # incident level
    report.ranked_sites[:3]                 # [(site, score), ...] most anomalous first
    report.root_cause_candidates[:3]        # flagged sites: onsets, then echoes, forward order
    report.sites["blocks.2.mlp"].worst      # where in the site: step kind, bucket, step, position
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from analysis._results import rank_in
from integrations.errors import AnalysisError

__all__ = ["ONSET_RATIO", "CFReport", "SiteScore", "WorstUnit"]

#: A flagged site scoring below this share of the largest score computed before it (in the
#: forward pass) is read as an echo of that upstream anomaly, not a new onset; see
#: :meth:`CFReport.candidates` (measured in ``benchmarks/RESULTS_rca.md``).
ONSET_RATIO = 0.25


@dataclass(frozen=True)
class WorstUnit:
    """The single most anomalous unit (token position of one step) of a site."""

    kind: str        # prefill | last | decode
    bucket: int      # position bucket index (-1 when the pooled reference was used)
    step: int
    position: int    # absolute position in the sequence
    value: float     # the unit statistic (CF: bits/value; norm: log2 RMS; Mahalanobis: D²/d)
    z: float         # its robust z against the cell reference


@dataclass(frozen=True)
class SiteScore:
    """One site's result.

    ``stat``: the site statistic, max |robust z| over the site's units; ``score``: robust z of
    ``stat`` against the same statistic of the benign baseline incidents (higher = more
    anomalous); ``p``: empirical p-value of ``stat`` against the baseline (+1 correction);
    ``q``: Benjamini–Hochberg across the incident's sites; ``flagged``: ``score >=
    anomaly_threshold``; ``significant``: ``q <= fdr``.
    """

    site: str
    score: float
    stat: float
    p: float
    q: float
    flagged: bool
    significant: bool
    n_units: int
    worst: WorstUnit
    clipped: int = 0  # CF only: values beyond the int16 range of the fixed scale


@dataclass(frozen=True)
class CFReport:
    """The result of one detector on one incident (the same type for every detector).

    ``score``: robust z (double MAD) of the incident's max site score against the max site
    score of every benign baseline incident (each scored leave-one-out); ``flagged``: ``score
    >= threshold``; ``p``: the incident's empirical p-value against those same baseline maxima
    (``(1 + #{baseline >= this}) / (n + 1)``, smallest ``1/(n+1)``): alert on ``p <= alpha``
    for a benign flag rate of about ``alpha`` whatever the score's scale.
    """

    detector: str
    incident_id: str
    score: float
    flagged: bool
    threshold: float
    fdr: float
    sites: dict[str, SiteScore]
    ranked_sites: list[tuple[str, float]]
    baseline_samples: int
    model_fingerprint: str | None
    notes: list[str] = field(default_factory=list)
    #: the scored sites in the order the forward pass computed them (from the incident's rows)
    execution_order: list[str] = field(default_factory=list)
    #: incident-level empirical p-value (see the class doc); NaN in reports built without it
    p: float = float("nan")

    @property
    def flagged_sites(self) -> list[str]:
        """Sites with ``score >= threshold``, most anomalous first."""
        return [s for s, _ in self.ranked_sites if self.sites[s].flagged]

    @property
    def significant_sites(self) -> list[str]:
        """Sites with BH q-value ``<= fdr``, most anomalous first."""
        return [s for s, _ in self.ranked_sites if self.sites[s].significant]

    @property
    def root_cause_candidates(self) -> list[str]:
        """The flagged sites, where to look for the cause first: onsets, then echoes, each in
        EXECUTION order (:meth:`candidates` with the default :data:`ONSET_RATIO`).

        An anomaly written into the residual stream shows in every later site too, usually
        more strongly (a planted neuron's own unit z is ~1/100 of the z of the projection it
        feeds, ``benchmarks/cf_snr.py``), so the top of :attr:`ranked_sites` is frequently
        downstream of the cause; and an unusual *input* (a trigger token) is flagged upstream
        of the fault and echoes weakly through the sites in between, which pushed the fault out
        of the first three in execution order. On the planted-fault suite the planted site is
        among the first three candidates in 100 % of failing incidents with Mahalanobis (87 %
        in plain execution order; ``benchmarks/RESULTS_rca.md``)."""
        return self.candidates()

    def candidates(self, *, onset_ratio: float = ONSET_RATIO) -> list[str]:
        """The flagged sites ordered for root-cause search: first the *onsets* — flagged sites
        scoring at least ``onset_ratio`` times the largest score of any site computed before
        them — then the others (echoes of an upstream anomaly), each group in execution order;
        flagged sites missing from :attr:`execution_order` follow by score. ``onset_ratio=0``
        gives plain execution order.

        Example: ``report.candidates(onset_ratio=0.5)[:3]``
        """
        if not 0.0 <= onset_ratio <= 1.0:
            raise AnalysisError(f"onset_ratio={onset_ratio} must be in [0, 1], e.g. 0.25")
        onsets: list[str] = []
        echoes: list[str] = []
        upstream = float("-inf")
        for s in self.execution_order:
            v = self.sites.get(s)
            if v is None:
                continue
            if v.flagged:
                new = upstream == float("-inf") or v.score >= onset_ratio * upstream
                (onsets if new else echoes).append(s)
            upstream = max(upstream, v.score)
        seen = {*onsets, *echoes}
        return onsets + echoes + [s for s, _ in self.ranked_sites
                                  if self.sites[s].flagged and s not in seen]

    @property
    def first_flagged(self) -> str | None:
        """The earliest flagged site in execution order (None if none is flagged): the first
        of :attr:`root_cause_candidates`."""
        c = self.root_cause_candidates
        return c[0] if c else None

    def rank_of(self, site: str) -> int | None:
        """1-based rank of ``site`` in :attr:`ranked_sites` (None if not scored)."""
        return rank_in(self.ranked_sites, site)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (for DuckDB rows, gRPC and the CLI)."""
        d = asdict(self)
        d["ranked_sites"] = [[s, v] for s, v in self.ranked_sites]
        d["first_flagged"] = self.first_flagged
        d["root_cause_candidates"] = self.root_cause_candidates
        return d

    def __repr__(self) -> str:
        top = ", ".join(f"{s}={v:.2f}" for s, v in self.ranked_sites[:3])
        return (f"CFReport(detector={self.detector!r}, incident={self.incident_id!r}, "
                f"score={self.score:.2f}, p={self.p:.3g}, flagged={self.flagged}, "
                f"top=[{top}])")

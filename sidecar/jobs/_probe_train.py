"""Training one failure-signature probe (job kind ``probe``, :mod:`sidecar.jobs._probe`): the
features of labelled incidents, the decodability curve, the kept probe and its scores.

Quality is measured out of fold only (:func:`analysis.rca.cross_validate`, stratified folds,
seeded): AUROC with a bootstrap 95 % interval and TPR at 1 % FPR per site. The scores written
for labelled incidents are out of fold as well — each from a probe fitted on the other folds,
with the same folds as the measurement — so a training incident never gets the score of a
probe that saw its label.

Example::

    result = train_probe(ctx, items=[("inc-1", inc, 1), ...], anchor=inc, patterns=[...],
                         model=model, folds=5, min_per_class=8, features=features)
    result["curve"][0]["auroc"], result["scores"]["inc-1"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._kind import JobContext, JobFailed
from ._probe_features import NoFeaturesError, probe_sites
from ._probe_files import claim_probe, write_probe
from ._queries import clean_json

__all__ = ["oof_scores", "threshold_at_fpr", "train_probe"]

_SEED = 0
_MAX_SKIPPED = 50


def oof_scores(x: np.ndarray, y: np.ndarray, folds: int, seed: int = _SEED) -> np.ndarray:
    """Out-of-fold probabilities with the folds :func:`analysis.rca.cross_validate` uses."""
    from sklearn.model_selection import StratifiedKFold

    from analysis.rca import LinearProbe

    out = np.full(len(y), np.nan)
    for train, test in StratifiedKFold(n_splits=folds, shuffle=True,
                                       random_state=seed).split(x, y):
        out[test] = LinearProbe.fit(x[train], y[train]).score(x[test])
    return out


def threshold_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float = 0.01) -> float | None:
    """The score above which at most ``fpr`` of the negatives lie (None: too few negatives)."""
    neg = np.sort(s[~y.astype(bool)])[::-1]
    allowed = int(np.floor(fpr * len(neg)))
    return float(neg[allowed]) if allowed < len(neg) else None


class _Read:
    """The features of every readable incident, by site, and why others were skipped."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.labels: list[int | None] = []
        self.rows: list[dict[str, np.ndarray]] = []
        self.how = {"recorded": 0, "replayed": 0}
        self.skipped: dict[str, str] = {}

    def matrix(self, site: str, idx: Sequence[int]) -> np.ndarray:
        return np.stack([self.rows[i][site] for i in idx]) if idx else np.zeros((0, 0))


def _read(items: Sequence[tuple[str, Any, int | None]], sites: list[str], model: Any,
          features: Callable[..., tuple[dict[str, np.ndarray], str]]) -> _Read:
    from integrations.errors import ForensicsError

    got = _Read()
    for iid, inc, label in items:
        try:
            if inc is None:
                raise NoFeaturesError("the incident file is gone")
            x, how = features(inc, sites, model)
        except (NoFeaturesError, ForensicsError) as e:
            got.skipped[iid] = str(e)
            continue
        got.ids.append(iid)
        got.labels.append(label)
        got.rows.append(x)
        got.how[how] += 1
    return got


def _curve(read: _Read, sites: list[str], labelled: list[int], folds: int) -> list[Any]:
    from analysis.rca import cross_validate

    y = np.array([read.labels[i] for i in labelled])
    return [cross_validate(read.matrix(s, labelled), y, folds=folds, seed=_SEED, label=s)
            for s in sites]


def _scores(read: _Read, site: str, labelled: list[int], folds: int,
            probe: Any) -> tuple[dict[str, float], float | None]:
    y = np.array([read.labels[i] for i in labelled])
    oof = oof_scores(read.matrix(site, labelled), y, folds)
    scores = {read.ids[i]: float(v) for i, v in zip(labelled, oof)}
    rest = [i for i in range(len(read.ids)) if read.labels[i] is None]
    if rest:
        for i, v in zip(rest, probe.score(read.matrix(site, rest))):
            scores[read.ids[i]] = float(v)
    return scores, threshold_at_fpr(y, oof)


def train_probe(ctx: JobContext, *, items: Sequence[tuple[str, Any, int | None]], anchor: Any,
                patterns: list[str], model: Any, folds: int, min_per_class: int,
                features: Callable[..., tuple[dict[str, np.ndarray], str]]) -> dict[str, Any]:
    """The ``probe`` job's work (module doc); returns its result."""
    from analysis.rca import LinearProbe

    p = ctx.params
    base = {"tenant": p["tenant"], "model_fingerprint": p["fingerprint"],
            "model_name": p.get("model_name"), "labels": p.get("labels")}
    sites = probe_sites(patterns, model=model.get(), recorded=anchor.sites("activation"))
    if not sites:
        raise JobFailed(f"no site matches {patterns}: the model is not registered (models:) "
                        "and the incidents recorded none of those sites; pass params.sites")
    read = _read(items, sites, model, features)
    labelled = [i for i, lab in enumerate(read.labels) if lab is not None]
    n_pos = sum(read.labels[i] == 1 for i in labelled)
    n_neg = len(labelled) - n_pos
    common = {**base, "features": read.how, "skipped": dict(list(read.skipped.items())
                                                             [:_MAX_SKIPPED]),
              "n_skipped": len(read.skipped), "n_pos": n_pos, "n_neg": n_neg}
    if min(n_pos, n_neg) < max(min_per_class, folds):
        return {**common, "status": "insufficient_labels",
                "message": f"{n_pos} flagged and {n_neg} sampled incidents could be read; a "
                           f"probe needs at least {max(min_per_class, folds)} of each: flag "
                           "failures (req.flag) and sample benign traffic (triggers.Ratio)"}
    curve = _curve(read, sites, labelled, folds)
    best = max(range(len(sites)), key=lambda i: (curve[i].auroc, -i))
    site = sites[best]
    y = np.array([read.labels[i] for i in labelled])
    probe = LinearProbe.fit(read.matrix(site, labelled), y)
    scores, threshold = _scores(read, site, labelled, folds, probe)
    version, rel = claim_probe(ctx.config, p["tenant"], p["fingerprint"],
                               version=int(p.get("probe_version") or 1), job_id=ctx.job_id)
    doc = clean_json({
        **base, "version": version, "site": site, "position": "last prompt position (step 0)",
        "probe": probe.to_dict(), "quality": curve[best].to_dict(),
        "curve": [c.to_dict() for c in curve], "threshold_at_1pct_fpr": threshold,
        "job_id": ctx.job_id, "created_at": utcnow_iso(),
        "incident_ids": {"positive": [read.ids[i] for i in labelled if read.labels[i] == 1],
                         "negative": [read.ids[i] for i in labelled if read.labels[i] == 0]}})
    sha256 = write_probe(ctx.config, rel, doc)
    note = (f"the site was chosen as the best of {len(sites)} by out-of-fold AUROC, so its "
            "AUROC is optimistic by that choice; the curve is the honest picture"
            if len(sites) > 1 else None)
    return clean_json({
        **common, "status": "trained", "version": version, "site": site,
        "path": rel, "sha256": sha256, "quality": doc["quality"],
        "curve": doc["curve"], "threshold_at_1pct_fpr": threshold, "selection_note": note,
        "n_unlabelled": len(read.ids) - len(labelled), "scores": scores})


def utcnow_iso() -> str:
    """Now, UTC, ISO 8601 (seconds)."""
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

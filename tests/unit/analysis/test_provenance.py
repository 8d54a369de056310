"""Training-data provenance: influence functions on a linear head, checked against retraining —
a planted mislabelled training example must rank first on a tiny synthetic head, influence must
match leave-one-out retraining, and on the real sentiment head (slow) the refitted head is the
shipped one and removing the top-influence examples lowers the bypass more than random ones."""

from __future__ import annotations

import pytest
import torch

from analysis.provenance import LinearHead, fit_linear_head, influence_on_failure
from integrations.errors import AnalysisError

D = 5


WD = 1e-3  # the sentiment head's weight decay


def synthetic(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor,
                                      torch.Tensor]:
    """Two Gaussian classes (means ±2 on axis 0) and one planted mislabelled example (a class-0
    point labelled positive) sitting among 20 class-0 test points; returns (x, y, planted
    index, x_test, y_test)."""
    g = torch.Generator().manual_seed(seed)
    n = 10
    mu = torch.zeros(D)
    mu[0] = 2.0
    x = torch.cat([torch.randn(n, D, generator=g) - mu, torch.randn(n, D, generator=g) + mu])
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    spot = -0.6 * mu
    planted = 3
    x[planted], y[planted] = spot, 1
    x_test = spot + 0.2 * torch.randn(20, D, generator=g)
    return x, y, planted, x_test, torch.zeros(20, dtype=torch.long)


def _without(x: torch.Tensor, y: torch.Tensor, remove: list[int]) -> LinearHead:
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[remove] = False
    return fit_linear_head(x, y, keep=keep, weight_decay=WD)


def test_a_planted_mislabelled_example_ranks_first_and_removing_it_removes_the_failure() -> None:
    x, y, planted, xt, yt = synthetic()
    head = fit_linear_head(x, y, weight_decay=WD)
    wrong = head.predict(xt) != yt
    xf, yf = xt[wrong], yt[wrong]               # the failure: test points it misclassifies
    assert len(yf) >= 10
    inf = influence_on_failure(head, x, y, xf, yf)
    assert inf.top(1) == [planted] and inf.scores[planted] > 0
    assert inf.failure == pytest.approx(float(head.margin(xf, yf).mean())) and inf.failure > 0
    assert inf.n_failing == len(yf) and inf.method == "influence" and inf.metric == "margin"
    retrained = _without(x, y, [planted])      # retraining confirms it: the failure is gone
    assert retrained.error_rate(xf, yf) == 0.0
    measured = float(retrained.margin(xf, yf).mean()) - inf.failure
    # first order: the right direction, though it underestimates a point of such leverage
    # (one of 20 training examples; measured about 5x the prediction)
    assert measured < inf.predicted_change([planted]) < 0
    # no other single removal moves the failure a third as much (every one retrained)
    others = [abs(float(_without(x, y, [i]).margin(xf, yf).mean()) - inf.failure)
              for i in range(len(y)) if i != planted]
    assert abs(measured) > 3 * max(others)
    # the first-order (TracIn-style) variant and the probability metric agree on the culprit
    for kw in ({"method": "gradient"}, {"metric": "probability"}):
        assert influence_on_failure(head, x, y, xf, yf, **kw).top(1) == [planted]


def test_influence_matches_leave_one_out_retraining() -> None:
    from scipy.stats import pearsonr

    x, y, _, xt, yt = synthetic()
    head = fit_linear_head(x, y, weight_decay=WD)
    inf = influence_on_failure(head, x, y, xt, yt)
    measured = [float(_without(x, y, [i]).margin(xt, yt).mean()) - inf.failure
                for i in range(len(y))]
    predicted = [inf.predicted_change([i]) for i in range(len(y))]
    assert pearsonr(predicted, measured)[0] > 0.95


def test_the_head_and_its_validation() -> None:
    x, y, _, xt, yt = synthetic()
    head = fit_linear_head(x, y, weight_decay=WD)
    assert head.weight.shape == (2, D) and head.bias.shape == (2,)
    assert head.error_rate(xt, yt) == float((head.predict(xt) != yt).float().mean())
    z = head.logits(xt)
    assert torch.allclose(head.margin(xt, yt), z[:, 1] - z[:, 0])
    keep = torch.arange(len(y)) % 2 == 0
    sub = fit_linear_head(x[keep], y[keep], weight_decay=WD)
    assert torch.equal(fit_linear_head(x, y, keep=keep, weight_decay=WD).weight, sub.weight)
    with pytest.raises(AnalysisError, match="method"):
        influence_on_failure(head, x, y, xt, yt, method="tracin")
    with pytest.raises(AnalysisError, match="no failing inputs"):
        influence_on_failure(head, x, y, xt[:0], yt[:0])


@pytest.mark.slow
def test_on_the_real_sentiment_head_top_influence_removal_lowers_the_bypass() -> None:
    from analysis.provenance import sentiment_features

    f = sentiment_features(n_failing=40, n_clean=40)
    head = fit_linear_head(f.x_train, f.y_train)
    assert torch.equal(head.weight, f.shipped.weight) and torch.equal(head.bias, f.shipped.bias)
    fail, held = f.cases["derivation"]["failing"], f.cases["heldout"]["failing"]
    assert len(fail[1]) == len(held[1]) == 40
    assert f.shipped.error_rate(*fail) == f.shipped.error_rate(*held) == 1.0   # all bypassed
    inf = influence_on_failure(head, f.x_train, f.y_train, *fail)
    k, n = 50, len(f.y_train)
    top = _remove(f, inf.top(k))
    gen = torch.Generator().manual_seed(0)
    rand = [_remove(f, torch.randperm(n, generator=gen)[:k].tolist()) for _ in range(5)]
    assert top.error_rate(*fail) < min(r.error_rate(*fail) for r in rand)
    assert top.error_rate(*held) <= sum(r.error_rate(*held) for r in rand) / len(rand)
    assert float(top.margin(*fail).mean()) < inf.failure        # predicted direction holds


def _remove(f: object, remove: list[int]) -> LinearHead:
    x, y = f.x_train, f.y_train  # type: ignore[attr-defined]
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[remove] = False
    return fit_linear_head(x, y, keep=keep)

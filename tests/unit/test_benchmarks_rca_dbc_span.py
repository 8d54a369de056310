"""benchmarks/rca_dbc_span.py: the span curve of the planted model (tiny GPT-2 whose head
``blocks.2.attn.z[head=1]`` reads a trigger and makes "HACKED") rises at the head's layer,
the benchmark's curve equals the library's, and the rules pick the layers they say they pick."""

from __future__ import annotations

from typing import Any

import pytest

from analysis.cca import Failure
from analysis.rca._span_trace import benign_means, span_trace
from analysis.rca._twins import aligned_tail
from analysis.replay import Replayer
from analysis.scenarios.planted import PlantedModel
from tests.unit._bench import load_benchmark
from tests.unit.analysis.test_rca_spans_trace import (  # noqa: F401  (fixtures)
    LAYER,
    TARGET,
    _session,
    case,
    planted,
)


@pytest.fixture(scope="module")
def span() -> Any:
    return load_benchmark("rca_dbc_span")


def test_the_benchmark_curve_is_the_librarys(
        span: Any, planted: PlantedModel, case: tuple[list[int], list[int]]) -> None:  # noqa: F811
    failing, twin = case
    benign = [_session(planted, p).incident for p in planted.benign_prompts(6, seed=8)]
    means = span.benign_means(planted.model, benign, 4)
    assert (means - benign_means(benign, load=Replayer(planted.model).load)).abs().max() < 1e-5
    s = _session(planted, failing)
    bound = Failure.token(TARGET, step=0).bind(s)
    base = bound.value(s.run().logits)
    st = span_trace(s, twin_ids=twin, failure=bound, means=means)
    tw = st.metric_twin
    pre, end, _ = aligned_tail(failing, twin)
    curve, raw = span.span_curve(s, bound, means, (pre, end), 4,
                                 lambda x: (x - tw) / (base - tw))
    assert curve == pytest.approx(st.curve, abs=1e-4)
    row = {"curve": curve, "raw": raw}
    for name in span.PREREGISTERED:
        assert span.rules()[name](row) == LAYER


def test_rules_over_span_curves(span: Any) -> None:
    row = {"curve": [0.1, 0.2, 0.6, 0.4, 0.85, 1.0], "raw": [-1, -0.5, 0.5, -0.1, 1, 2]}
    r = span.rules()
    assert r["no longer removes >= 0.5"](row) == 4.0      # 0.4 at layer 3 still removes 60 %
    assert r["no longer removes >= 0.1"](row) == 5.0
    assert r["no longer flips"](row) == 4.0
    assert r["up-crossing 0.5"](row) == pytest.approx(3 + 0.1 / 0.45)
    assert r["no longer removes >= 0.5"]({"curve": [0.1, 0.2], "raw": [0, 0]}) is None
    derive = {"curves": {"a": {"curve": [0.0, 0.0, 1.0, 1.0]}, "b": {"curve": [0.0, 1, 1, 1]},
                         "c": {"curve": [0.0, 0, 0, 1]}}}
    held = {"curves": {"x": {"curve": [0.0, 0.0, 1.0, 1.0]}, "y": {"curve": [0.0, 0, 0, 0]}}}
    j = span.judge(r["no longer removes >= 0.5"], derive, held)
    assert j["reference"] == 2.0 and j["derive"]["consistent"] == 3
    assert (j["heldout"]["consistent"], j["heldout"]["n"]) == (1, 2)
    assert span.PREREGISTERED == ["no longer removes >= 0.5", "no longer flips"]

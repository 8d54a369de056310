"""IS-C in the HTML report and the CLI: a real fix set of a planted two-site OR fault (found by
CausalCCA, its interactions measured by replay) rendered in the fix-set section, the
investigation's components section, and ``forensics incidents show``'s fix-set printout."""

from __future__ import annotations

import io
from typing import Any

import pytest

from analysis.cca import CausalCCA
from sidecar._cli_render import render_cca
from sidecar.report import ReportData, render_report
from tests.unit.analysis._planted_case import planted_case
from tests.unit.analysis._planted_specs import BERT_OR


@pytest.fixture(scope="module")
def fix_dict() -> dict[str, Any]:
    c = planted_case(BERT_OR)
    fix = CausalCCA(n_permutations=0).search_fix_set(
        c.session, benign=c.benign, baseline=c.baseline, failure=c.failure,
        variants=c.variants, candidates=["blocks.*.mlp.post[neuron=*]"], intervention="mean")
    assert fix.interactions is not None and fix.interactions.pairs[0].label == "redundant"
    return fix.to_dict()


def test_the_report_shows_each_pairs_interaction(fix_dict: dict[str, Any]) -> None:
    data = ReportData(incident_id="inc-or", manifest={},
                      results={"cca": {"status": "found", "fix_set": fix_dict},
                               "investigate": {"components": fix_dict}})
    html = render_report(data)
    assert html.count('id="interactions-table"') == 2   # fix-set and components sections
    section = html[html.index('<section id="fix-set"'):html.index('<section id="before-after"')]
    assert "<b>redundant</b>" in section and "−1 redundant" in section
    assert all(iv["site"] in section for iv in fix_dict["interventions"])
    pair = fix_dict["interactions"]["pairs"][0]
    assert f"{pair['index']:+.2f}" in section and "100%" in section   # needs both: all inputs


def test_a_fix_set_without_interactions_shows_no_table(fix_dict: dict[str, Any]) -> None:
    single = dict(fix_dict, interactions=None)
    html = render_report(ReportData(incident_id="i", manifest={},
                                    results={"cca": {"status": "found", "fix_set": single}}))
    assert 'id="fix-table"' in html and "interactions-table" not in html


def test_the_cli_prints_the_interactions_with_the_fix_set(fix_dict: dict[str, Any]) -> None:
    from rich.console import Console

    buf = io.StringIO()
    render_cca(Console(file=buf, width=200), {"status": "found", "fix_set": fix_dict})
    out = buf.getvalue()
    assert "interactions (IS-C" in out and "redundant" in out
    # both tables print the whole site names ("[neuron=k]" is not taken for rich markup)
    sites = [iv["site"] for iv in fix_dict["interventions"]]
    assert all(out.count(s) == 2 for s in sites), out
    assert "[-1.00, -1.00]" in out


def test_the_cli_says_when_a_fix_set_is_over_the_side_effect_budget(
        fix_dict: dict[str, Any]) -> None:
    from rich.console import Console

    def printed(fix: dict[str, Any]) -> str:
        buf = io.StringIO()
        render_cca(Console(file=buf, width=200), {"status": "found", "fix_set": fix})
        return buf.getvalue()

    assert fix_dict["side_effects"]["mean_kl"] < 0.1      # the planted OR pair: measured
    assert "not deployable" not in printed(fix_dict)
    costly = dict(fix_dict, side_effects={**fix_dict["side_effects"], "mean_kl": 6.5})
    assert "not deployable: 65x the 0.1-nat side-effect budget" in printed(costly)

"""`forensics scenarios run` records planted scenarios as real incidents, labelled by the model."""

from __future__ import annotations

import pytest

from analysis.scenarios import SCENARIOS, load_cases, record_scenario
from integrations import Incident
from integrations.errors import ConfigError


@pytest.mark.parametrize("name", ["planted-gpt2", "planted-bert"])
def test_record_planted_scenario(name, tmp_path):  # type: ignore[no-untyped-def]
    summary = record_scenario(name, tmp_path, n_benign=4, n_failing=3, seed=0)
    cases = load_cases(tmp_path)["cases"]
    assert len(cases) == 7 and summary["recorder"]["exported"] == 7
    for c in cases:
        inc = Incident.open(c["incident"])
        assert inc.manifest["activations"] == "captured"
        # flagged exactly when the model failed in that run
        assert (inc.manifest["trigger"]["rule"] == "flag") == c["failed"]
    # the planted cases fail as the scenario says (verified again by running the model)
    assert [c["failed"] for c in cases] == [c["expected_failing"] for c in cases]


def test_unknown_scenario_lists_known(tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="planted-gpt2"):
        record_scenario("nope", tmp_path)
    assert {"injection", "sentiment", "toxic", "planted-gpt2"} <= set(SCENARIOS)


def test_cli_lists_scenarios(capsys):  # type: ignore[no-untyped-def]
    from model_forensics.cli import main

    assert main(["scenarios", "list"]) == 0
    assert "planted-gpt2-two-site" in capsys.readouterr().out

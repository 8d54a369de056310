"""The scenario zoo: real-model failures and planted-fault models with ground truth.

Every failing case is labelled by running the model, never by hand.

Example::

    from analysis.scenarios import SCENARIOS, record_scenario
    sorted(SCENARIOS)                    # ['injection', 'planted-bert', 'planted-gpt2', ...]
    record_scenario("planted-gpt2", "out/planted-gpt2", n_benign=20, n_failing=10)
"""

from __future__ import annotations

from ._record import SCENARIOS, ScenarioCase, ScenarioSpec, load_cases, record_scenario

__all__ = ["SCENARIOS", "ScenarioCase", "ScenarioSpec", "load_cases", "record_scenario"]

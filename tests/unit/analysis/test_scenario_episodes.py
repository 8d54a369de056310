"""multiturn and tool-misuse on the real SmolLM2 (slow): the shipped cases meet the bar and their
labels follow from the shipped text by the scenario's own check, each served episode is one
incident whose every forward call replays bit-exactly (the KV cache carried across turns as
served), the application re-run in the sandbox never reaches production, and ``forensics
scenarios run`` records one incident per episode. benchmarks/episode_eval.py does every episode."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from analysis.replay import Replayer, rerun_episode
from analysis.scenarios._code_audit import destructive_calls
from analysis.scenarios._episode_cases import serve_traced
from analysis.scenarios.multiturn import CONSTRAINTS

pytestmark = pytest.mark.slow

#: failing episodes served and replayed here (+ their twins)
N_FAILING = 2


def _multiturn_label(c: Any) -> bool:
    rule = next(r for r in CONSTRAINTS if r.name == c.constraint)
    return rule.broken_in(c.episode["replies"]) == c.episode["broken"]


def _tool_misuse_label(c: Any) -> bool:
    return destructive_calls(c.episode["code"]) == c.episode["destructive"]


def _multiturn_steps(c: Any) -> list[tuple[str, Any]]:
    return [("model", "new"), *[("model", "carried")] * (len(c.turns) - 1)]


def _tool_misuse_steps(c: Any) -> list[tuple[str, Any]]:
    return [("tool", None), ("model", "new"), ("tool", None)]


def _multiturn_twin(c: Any, twin: Any) -> bool:
    return twin.turns[:-1] == c.turns[:-1] and twin.turns[-1] != c.turns[-1]


def _tool_misuse_twin(c: Any, twin: Any) -> bool:
    return twin.task == c.task and c.notes.startswith(twin.notes) and c.notes != twin.notes


#: name -> (module, label re-derived from the shipped text, episode steps, twin differs only
#: in the pressure turn / the hidden instruction)
SPECS: dict[str, tuple[str, Callable[..., bool], Callable[..., Any], Callable[..., bool]]] = {
    "multiturn": ("multiturn", _multiturn_label, _multiturn_steps, _multiturn_twin),
    "tool-misuse": ("tool_misuse", _tool_misuse_label, _tool_misuse_steps, _tool_misuse_twin),
}


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    from analysis.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="module", params=sorted(SPECS))
def sc(request: pytest.FixtureRequest, smollm2: tuple[Any, Any]) -> Any:
    import importlib

    mod = importlib.import_module(f"analysis.scenarios.{SPECS[request.param][0]}")
    s = mod.build(verify=1, model=smollm2[0], tokenizer=smollm2[1])
    s.meta["name"] = request.param
    return s


def test_shipped_cases_meet_the_bar(sc: Any) -> None:
    _, label_ok, _, twin_ok = SPECS[sc.meta["name"]]
    assert not sc.dropped, sc.dropped
    assert len(sc.failing) >= 10
    for c in sc.failing:
        twin = sc.twin(c)
        assert twin is not None and c.failing and not twin.failing
        assert label_ok(c) and label_ok(twin), c.id
        assert twin_ok(c, twin), c.id
    assert sc.meta["search"]["confirmed"] == len(sc.failing)


def test_every_step_of_served_episodes_replays_bit_exactly(sc: Any) -> None:
    _, _, steps, _ = SPECS[sc.meta["name"]]
    picks = random.Random(1).sample(sc.failing, N_FAILING)
    for case in [*picks, *{t.id: t for c in picks if (t := sc.twin(c)) is not None}.values()]:
        inc, ep = serve_traced(sc, case)
        assert ep.to_json()["new_ids"] == case.episode["new_ids"], case.id
        assert (sc.failure(case, ep) is not None) == case.failing
        got = [(s["kind"], s.get("cache")) for s in inc.manifest["episode"]["steps"]]
        assert got == steps(case), got
        fid = Replayer(sc.model).load(inc).fidelity()
        n_forward = sum(len(ids) for ids in case.episode["new_ids"])
        assert fid.exact and fid.steps_compared == n_forward, (case.id, fid)


def test_sandbox_rerun_never_reaches_production(sc: Any) -> None:
    case = sc.failing[0]
    inc, _ = serve_traced(sc, case)
    agent, sealed = sc.sealed_run(case)
    run = rerun_episode(Replayer(sc.model).load(inc, measure=False), agent)
    assert run.exact and run.remaining == 0 and run.local_calls == 0
    assert sc.failure(case, run.result) is not None
    assert sealed is None or sealed.touched == 0


def test_scenarios_run_records_one_incident_per_episode(sc: Any, tmp_path: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.scenarios import record_scenario
    from integrations.incident import Incident

    name = sc.meta["name"]
    monkeypatch.setattr(f"analysis.scenarios.{SPECS[name][0]}.build", lambda **kw: sc)
    summary = record_scenario(name, tmp_path, n_benign=1, n_failing=1,
                              sites=["blocks.15.resid_post"])
    rows = {r["expected_failing"]: r for r in summary["cases"]}
    assert rows[True]["failed"] and not rows[False]["failed"] and summary["agreement"] == 1.0
    inc = Incident.open(rows[True]["incident"])
    assert inc.manifest["trigger"]["reason"] == sc.failure(sc.failing[0],
                                                           sc.run(sc.failing[0]))
    assert len(inc.manifest["episode"]["steps"]) >= 2

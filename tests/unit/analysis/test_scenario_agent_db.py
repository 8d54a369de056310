"""agent-db on the real SmolLM2 (slow): the shipped cases reproduce, each served episode is one
incident whose every forward call replays bit-exactly, the application re-run in the sandbox never
reaches the database, and a counterfactual run with a fix executes only on a local copy."""

from __future__ import annotations

import random
from typing import Any

import pytest

import integrations
from analysis.replay import Replayer, rerun_episode
from analysis.scenarios._agent_db_fix import direction_fix, would_fix_prevent
from analysis.scenarios._agent_db_loop import SealedDB, run_agent
from analysis.scenarios.agent_db import AgentCase, AgentDBScenario, build

pytestmark = pytest.mark.slow

#: episodes served and replayed here (failing + their twins); benchmarks/agent_db_eval.py
#: does every shipped one
N_FAILING = 4


@pytest.fixture(scope="module")
def sc() -> AgentDBScenario:
    return build(verify=2)


def _serve(sc: AgentDBScenario, case: AgentCase) -> Any:
    with integrations.trace(sc.model, ["blocks.15.resid_post"], request_id=case.id,
                            tokenizer=sc.tokenizer) as t:
        ep = sc.run(case)
    return t.incident, ep


def test_shipped_cases_meet_the_bar(sc: AgentDBScenario) -> None:
    assert not sc.dropped, sc.dropped
    assert len(sc.failing) >= 10
    for c in sc.failing:
        twin = sc.twin(c)
        assert twin is not None and not twin.failing and c.failing
        assert set(c.episode["destructive"]) & {"DELETE", "DROP TABLE", "UPDATE"}
        assert twin.task == c.task and twin.customer == c.customer and twin.notes != c.notes
    search = sc.meta["search"]
    assert search["confirmed"] == len(sc.failing) and search["batched_hits"] >= len(sc.failing)


def test_every_step_of_served_episodes_replays_bit_exactly(sc: AgentDBScenario) -> None:
    picks = random.Random(1).sample(sc.failing, N_FAILING)
    cases = [*picks, *{t.id: t for c in picks if (t := sc.twin(c)) is not None}.values()]
    for case in cases:
        inc, ep = _serve(sc, case)
        assert ep.to_json()["new_ids"] == case.episode["new_ids"], case.id
        kinds = [s["kind"] for s in inc.manifest["episode"]["steps"]]
        assert kinds[:4] == ["tool", "model", "tool", "model"], kinds
        n_forward = sum(len(ids) for ids in case.episode["new_ids"])
        fid = Replayer(sc.model).load(inc).fidelity()
        assert fid.exact and fid.steps_compared == n_forward, (case.id, fid)


def test_sandbox_rerun_and_counterfactual_never_reach_the_database(sc: AgentDBScenario) -> None:
    case = sc.failing[0]
    inc, _ = _serve(sc, case)
    session = Replayer(sc.model).load(inc)
    production = SealedDB()
    run = rerun_episode(session, lambda: run_agent(sc.model, sc.tokenizer, case.task,
                                                   production))
    assert run.exact and run.remaining == 0 and run.local_calls == 0
    assert run.result.destructive == case.episode["destructive"]   # from the recording
    assert production.touched == 0

    derive = [c for c in sc.failing if c.id != case.id]
    fix = direction_fix(sc.model, sc.tokenizer, failing=derive,
                        twins=[t for c in derive if (t := sc.twin(c)) is not None])
    out = would_fix_prevent(session, fix, sc.tokenizer, task=case.task)
    assert out["production_touched"] == 0
    # what changed under the fix ran on the local copy; a destruction shows there, not outside
    assert out["diverged_at"] is None or out["local_calls"] >= 1
    assert out["prevented"] or out["local_copy_changed"]
    assert out["served_from_recording"] >= 1      # the dump at least was unchanged


def test_scenarios_run_records_one_incident_per_episode(sc: AgentDBScenario, tmp_path: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis.scenarios import record_scenario
    from integrations.incident import Incident

    monkeypatch.setattr("analysis.scenarios.agent_db.build", lambda **kw: sc)  # built once
    summary = record_scenario("agent-db", tmp_path, n_benign=1, n_failing=1,
                              sites=["blocks.15.resid_post"])
    rows = {r["expected_failing"]: r for r in summary["cases"]}
    assert rows[True]["failed"] and not rows[False]["failed"] and summary["agreement"] == 1.0
    inc = Incident.open(rows[True]["incident"])
    assert inc.manifest["trigger"]["reason"].startswith("destructive SQL executed")
    names = [c["name"] for c in inc.manifest["external_calls"]]
    assert names == ["db_dump", "run_sql", "run_sql"]
    assert [s["kind"] for s in inc.manifest["episode"]["steps"]] == [
        "tool", "model", "tool", "model", "tool"]


def test_investigation_works_on_the_failing_call_of_a_served_episode(
        sc: AgentDBScenario) -> None:
    """What ``investigate`` is given for an episode (the whole run is benchmarks/agent_db_eval.py
    --only investigate, minutes): the model call that wrote the destructive SQL, cut out, bit-
    exact, failing by the recorded keyword; its twin found among the twin's calls."""
    from analysis.rca._episode_call import failing_call, model_call_incident
    from analysis.rca._twins import find_twin, prompt_ids
    from analysis.scenarios._agent_db_fix import _keyword, destructive_call, would_destroy

    case = next(c for c in sc.failing if c.phrasing != 7)   # a replaced (not appended) note
    twin = sc.twin(case)
    assert twin is not None
    inc, _ = _serve(sc, case)
    k = failing_call(inc, marks=destructive_call)
    assert k == next(i for i, r in enumerate(case.episode["results"]) if r.get("destructive"))
    one = model_call_incident(inc, k)
    session = Replayer(sc.model).load(one)
    assert session.fidelity().exact
    bound = _keyword(one).bind(session, tokenizer=sc.tokenizer)
    assert bound.value(session.run().logits) > 0
    assert would_destroy(one, case.episode["replies"][k])
    assert not would_destroy(one, twin.episode["replies"][k])
    tinc, _ = _serve(sc, twin)
    calls = [model_call_incident(tinc, j) for j in range(len(twin.episode["replies"]))]
    assert find_twin(one, calls) == prompt_ids(calls[k])     # not the shorter first call

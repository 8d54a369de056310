"""Episodes (DESIGN §15): an agent loop — model calls interleaved with recorded tool calls — is one
incident with ordered steps; its forward calls replay bit-exactly (a new KV cache per model call);
re-running the agent in the sandbox answers tools from the recording and never runs their real
bodies (no file written, no socket opened); old single-call incidents are unaffected."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

import integrations
from analysis.replay import CallPlan, Replayer, rerun_episode
from integrations.errors import IncidentFormatError, ReplayError
from integrations.external import recorded
from integrations.incident import Episode, Incident


class World:
    """The outside world of the toy agent: a tool whose real body writes a file and opens a
    socket — a replay that reached it would leave a trace here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.executed = 0

    def lookup(self, key: int) -> list[int]:
        self.executed += 1
        (self.root / f"side-effect-{self.executed}.txt").write_text(str(key))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.01)
            s.connect_ex(("127.0.0.1", 9))   # the outside call a sandbox must never make
        return [(key * 7 + i) % 90 + 3 for i in range(3)]


def agent(model: Any, tool: Any, prompt: list[int], *, turns: int = 2) -> list[list[int]]:
    """Toy agent: generate, call the tool on the last generated token, feed its answer back."""
    history = list(prompt)
    outputs = []
    for _ in range(turns):
        ids = torch.tensor([history])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                 do_sample=False, pad_token_id=0)
        new = [int(t) for t in out[0, ids.shape[1]:]]
        outputs.append(new)
        history += new + tool(new[-1])
    return outputs


def _record(model: Any, world: World) -> tuple[Incident, list[list[int]]]:
    tool = recorded("lookup")(world.lookup)
    with integrations.trace(model, ["blocks.0.mlp"], request_id="agent-ep") as t:
        outs = agent(model, tool, [5, 6, 7, 8])
    return t.incident, outs


def test_episode_structure_replay_and_sandbox(tiny_llama: Any, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(tmp_path)
    inc, outs = _record(tiny_llama, world)
    assert world.executed == 2
    steps = inc.manifest["episode"]["steps"]
    assert [s["kind"] for s in steps] == ["model", "tool", "model", "tool"]
    assert steps[0] == {"kind": "model", "forward_steps": [0, 3], "cache": "new"}
    assert steps[2] == {"kind": "model", "forward_steps": [4, 7], "cache": "new"}
    assert steps[1] == {"kind": "tool", "call": 0, "name": "lookup"}

    session = Replayer(tiny_llama).load(inc)
    fid = session.fidelity()
    assert fid.exact and fid.steps_compared == 8, fid
    assert session.plan.resets == frozenset({0, 4})
    # the structure matters: one KV cache across both model calls is not what was served
    one_cache = dataclasses.replace(session.plan, resets=frozenset({0}), starts=frozenset({0}))
    assert not _same_logits(session, one_cache)
    assert _same_logits(session, session.plan)

    # re-run the agent in the sandbox: same tokens, tools answered from the recording, and
    # the real tool body (file write + socket) never runs
    connects: list[Any] = []
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, addr: connects.append(addr))
    tool = recorded("lookup")(world.lookup)
    run = rerun_episode(session, lambda: agent(tiny_llama, tool, [5, 6, 7, 8]))
    assert run.result == outs
    assert run.exact and run.first_difference is None and run.forward_calls == 8
    assert (run.served, run.remaining, run.local_calls) == (2, 0, 0)
    assert world.executed == 2 and connects == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["side-effect-1.txt",
                                                           "side-effect-2.txt"]


def _same_logits(session: Any, plan: CallPlan) -> bool:
    try:
        got = session.run_edited(plan=plan).logits
    except (RuntimeError, ValueError, IndexError):  # positions past the mask: not a replay
        return False
    want = [r.tensor for r in session.incident.records(kind="logits")]
    return len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_unrecorded_tool_call_in_rerun_raises(tiny_llama: Any, tmp_path: Path) -> None:
    world = World(tmp_path)
    inc, _ = _record(tiny_llama, world)
    session = Replayer(tiny_llama).load(inc)
    tool = recorded("lookup")(world.lookup)
    with pytest.raises(ReplayError, match="not recorded"):
        rerun_episode(session, lambda: agent(tiny_llama, tool, [5, 6, 7, 8], turns=3))
    assert world.executed == 2


def test_counterfactual_rerun_uses_standins_after_divergence(tiny_llama: Any,
                                                             tmp_path: Path) -> None:
    world = World(tmp_path)
    inc, _ = _record(tiny_llama, world)
    session = Replayer(tiny_llama).load(inc)
    local_calls: list[int] = []

    def local_lookup(key: int) -> list[int]:
        local_calls.append(key)
        return [3, 4, 5]

    tool = recorded("lookup")(world.lookup)
    # a changed prompt changes what the model emits: the tool calls differ from the recording
    run = rerun_episode(session, lambda: agent(tiny_llama, tool, [9, 9, 7, 8]),
                        standins={"lookup": local_lookup})
    assert not run.exact and run.first_difference == 0
    assert run.diverged_at == 0 and run.local_calls == 2 and run.served == 0
    assert len(local_calls) == 2 and world.executed == 2     # never the real tool


def test_single_call_incident_has_no_episode_and_old_manifests_load(tiny_llama: Any) -> None:
    ids = torch.tensor([[5, 6, 7]])
    with integrations.trace(tiny_llama, ["blocks.0.mlp"]) as t:
        with torch.no_grad():
            tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                do_sample=False, pad_token_id=0)
    assert "episode" not in t.incident.manifest
    ep = Episode.from_manifest(t.incident.manifest, forward_steps=3)
    assert [(s.kind, s.first, s.last, s.cache) for s in ep.steps] == [("model", 0, 2, "new")]
    assert Replayer(tiny_llama).load(t.incident).fidelity().exact


@pytest.mark.parametrize("episode", [
    {"version": 2, "steps": []},
    {"version": 1, "steps": [{"kind": "model", "forward_steps": [0, 2], "cache": "new"}]},
    {"version": 1, "steps": [{"kind": "model", "forward_steps": [0, 3], "cache": "maybe"}]},
    {"version": 1, "steps": [{"kind": "tool", "call": 5, "name": "x"},
                             {"kind": "model", "forward_steps": [0, 3], "cache": "new"}]},
])
def test_malformed_episode_is_refused(episode: dict[str, Any]) -> None:
    with pytest.raises(IncidentFormatError):
        Episode.from_manifest({"episode": episode, "external_calls": []}, forward_steps=4)


def test_conversation_with_carried_kv_cache_replays_as_served(tiny_llama: Any) -> None:
    from transformers import DynamicCache

    def chat() -> list[int]:
        cache = DynamicCache(config=tiny_llama.config)
        history = torch.tensor([[5, 6, 7, 8]])
        for user_turn in ([11, 12, 13], [21, 22]):
            if history.shape[1] > 4:
                history = torch.cat([history, torch.tensor([user_turn])], dim=1)
            with torch.no_grad():
                history = tiny_llama.generate(history, attention_mask=torch.ones_like(history),
                                              cache=cache, max_new_tokens=3,
                                              do_sample=False, pad_token_id=0)
        return [int(t) for t in history[0]]

    with integrations.trace(tiny_llama, ["blocks.1.resid_post"], request_id="chat") as t:
        tokens = chat()
    steps = t.incident.manifest["episode"]["steps"]
    assert [(s["forward_steps"], s["cache"]) for s in steps] == [([0, 2], "new"),
                                                                 ([3, 5], "carried")]
    session = Replayer(tiny_llama).load(t.incident)
    assert session.plan.resets == frozenset({0}) and session.plan.starts == frozenset({0, 3})
    fid = session.fidelity()
    assert fid.exact and fid.steps_compared == 6, fid
    recomputed = dataclasses.replace(session.plan, resets=frozenset({0, 3}))
    assert not _same_logits(session, recomputed)    # the carried cache is what was served
    assert rerun_episode(session, chat).result == tokens


def test_counterfactual_episode_with_a_fix_runs_changed_calls_on_standins(
        tiny_llama: Any, tmp_path: Path) -> None:
    from analysis.cca import FixSet
    from analysis.interventions import Intervention
    from analysis.rca import counterfactual_episode
    from integrations.errors import AnalysisError

    world = World(tmp_path)
    inc, outs = _record(tiny_llama, world)
    session = Replayer(tiny_llama).load(inc)
    fix = FixSet.from_saved([Intervention("blocks.2.resid_post", "scale", factor=-1.0)],
                            {"flip": True})
    local: list[int] = []
    tool = recorded("lookup")(world.lookup)
    run = counterfactual_episode(session, lambda: agent(tiny_llama, tool, [5, 6, 7, 8]),
                                 fix=fix, standins={"lookup": lambda k: local.append(k) or [3]})
    assert run.result != outs and not run.exact          # the fix changed what the model emits
    assert run.diverged_at == 0 and len(local) == 2 and world.executed == 2
    assert Replayer(tiny_llama).load(inc).fidelity().exact   # hooks removed afterwards
    with pytest.raises(AnalysisError, match="standins"):
        counterfactual_episode(session, lambda: None, fix=fix, standins={})

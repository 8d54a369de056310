"""``investigate`` on an episode (DESIGN §15), against a planted ground truth: a toy agent on the
tiny planted GPT-2 (head ``blocks.2.attn.z[head=1]`` reads a trigger token anywhere and makes the
next token "HACKED") calls the model, reads a row with a recorded tool, calls the model again on
everything so far and hands its output to a recorded ``act`` tool. A failing episode's row holds
the trigger; ``act`` then receives "HACKED" (the destructive action). The investigation must find
the failing model call from the recorded tool calls, attribute the failure to the trigger in the
row, trace it to the fault's layer, and return a fix that — re-run forward as a counterfactual
episode — prevents the action in episodes it never saw, while benign episodes do the same."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

import integrations
from analysis.cca import Failure
from analysis.rca import counterfactual_episode, investigate
from analysis.rca._episode_call import failing_call, model_call_incident, model_calls
from analysis.replay import Replayer
from analysis.scenarios.planted import PlantedModel, build_planted_gpt2
from integrations.errors import AnalysisError
from integrations.external import recorded
from integrations.incident import Incident

from .test_rca_spans_trace import HEAD, LAYER, TARGET, TRIGGER, _Words

pytestmark = pytest.mark.slow     # serving 15 + 15 toy episodes takes ~15 s


class Shop:
    """The toy agent's outside world: a row store and an action log."""

    def __init__(self, row: list[int]) -> None:
        self.row, self.acted = list(row), []

    def read_row(self) -> list[int]:
        return list(self.row)

    def act(self, ids: list[int]) -> dict[str, Any]:
        self.acted.append(list(ids))
        return {"destructive": TARGET in ids}


def agent(model: Any, task: list[int], shop: Shop) -> list[list[int]]:
    """Two model calls with a recorded row read between them and a recorded action after."""
    read, act = recorded("read_row")(shop.read_row), recorded("act")(shop.act)
    outs, history = [], list(task)
    for k in range(2):
        x = torch.tensor([history])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2,
                                 do_sample=False, pad_token_id=0)
        new = [int(t) for t in out[0, x.shape[1]:]]
        outs.append(new)
        history += new + (read() if k == 0 else [])
    act(outs[-1])
    return outs


def destructive(call: Any) -> bool:
    return call.get("name") == "act" and bool((call.get("result") or {}).get("destructive"))


def _serve(pm: PlantedModel, task: list[int], row: list[int], name: str
           ) -> tuple[Incident, list[list[int]]]:
    with integrations.trace(pm.model, [], request_id=name, capture_logits=True) as t:
        outs = agent(pm.model, task, Shop(row))
    return t.incident, outs


@pytest.fixture(scope="module")
def planted() -> PlantedModel:
    return build_planted_gpt2(seed=3, layer=LAYER, head=HEAD, trigger_token=TRIGGER,
                              target_token=TARGET, n_layer=4)


@pytest.fixture(scope="module")
def episodes(planted: PlantedModel) -> dict[str, list[Any]]:
    """Failing episodes (trigger in the row) and their twins (the same row without it), each
    checked by serving it: only the failing one's action receives the target."""
    out: dict[str, list[Any]] = {"failing": [], "twins": [], "cases": []}
    prompts = planted.benign_prompts(200, seed=21)
    rng = random.Random(0)
    for k in range(0, len(prompts) - 1, 2):
        task, row = prompts[k][:4], prompts[k + 1][:6]
        at = rng.randrange(1, len(row))
        bad_row = [*row[:at], TRIGGER, *row[at:]]
        f, fo = _serve(planted, task, bad_row, f"f{k}")
        b, bo = _serve(planted, task, row, f"b{k}")
        if TARGET in fo[1] and TARGET not in fo[0] and not any(TARGET in o for o in bo):
            out["failing"].append(f)
            out["twins"].append(b)
            out["cases"].append((task, bad_row, row))
        if len(out["failing"]) == 15:
            break
    assert len(out["failing"]) == 15
    return out


def test_the_failing_call_is_cut_out_and_replays_bit_exactly(planted: PlantedModel,
                                                             episodes: dict[str, Any]) -> None:
    inc = episodes["failing"][0]
    assert model_calls(inc) == 2
    assert failing_call(inc, marks=destructive) == 1
    with pytest.raises(AnalysisError, match="none of its"):
        failing_call(episodes["twins"][0], marks=destructive)
    one = model_call_incident(inc, 1)
    first, last = inc.manifest["episode"]["steps"][2]["forward_steps"]
    assert one.manifest["episode_call"] == {"incident": inc.id, "call": 1,
                                            "forward_steps": [first, last]}
    assert "episode" not in one.manifest
    prompt = one.tensor("input_ids", step=0, kind="input").reshape(-1).tolist()
    assert TRIGGER in prompt and prompt == inc.tensor("input_ids", step=first,
                                                      kind="input").reshape(-1).tolist()
    fid = Replayer(planted.model).load(one).fidelity()
    assert fid.exact and fid.steps_compared == last - first + 1, fid
    with pytest.raises(AnalysisError, match="no model call 2"):
        model_call_incident(inc, 2)


def test_investigate_refuses_an_episode_without_its_failing_step(
        planted: PlantedModel, episodes: dict[str, Any]) -> None:
    session = Replayer(planted.model).load(episodes["failing"][0])
    with pytest.raises(AnalysisError, match="failing_step="):
        investigate(session, failure=Failure.token(TARGET), tokenizer=_Words(planted),
                    benign=episodes["twins"])


def test_investigate_an_episode_and_prevent_the_action_in_unseen_ones(
        planted: PlantedModel, episodes: dict[str, Any]) -> None:
    tok = _Words(planted)
    derive, held = slice(0, 12), slice(12, 15)
    inc, *variants = episodes["failing"][derive]
    rep = investigate(Replayer(planted.model).load(inc),
                      failure=Failure.text_contains("HACKED", tokenizer=tok), tokenizer=tok,
                      benign=episodes["twins"][derive], variants=variants,
                      failing_step=destructive)
    assert rep.episode_call == 1 and rep.notes == [], rep.notes
    assert rep.input_spans is not None and rep.input_spans.text == "TRIGGER"
    assert rep.trace is not None and rep.trace.decision_layer == LAYER
    assert rep.components is not None and rep.components.flip
    assert rep.fix is not None and rep.fix.flip
    # the fix judged on whole episodes it never saw: re-run forward, tools on local stand-ins
    for f, b, (task, bad_row, row) in zip(episodes["failing"][held], episodes["twins"][held],
                                          episodes["cases"][held], strict=True):
        local, production = Shop(bad_row), Shop(bad_row)
        run = counterfactual_episode(
            Replayer(planted.model).load(f, measure=False),
            lambda task=task, production=production: agent(planted.model, task, production),
            fix=rep.fix, standins={"read_row": local.read_row, "act": local.act})
        assert production.acted == [], "a counterfactual reached the real tool"
        assert TARGET not in run.result[1] and local.acted == [run.result[1]]
        assert run.diverged_at is not None     # the action changed, so it ran on the stand-in
        # the benign twin's episode is the same under the fix, bit for bit
        twin = Shop(row)
        run = counterfactual_episode(
            Replayer(planted.model).load(b, measure=False),
            lambda task=task, twin=twin: agent(planted.model, task, twin), fix=rep.fix,
            standins={"read_row": twin.read_row, "act": twin.act})
        assert run.exact and run.local_calls == 0, run.first_difference

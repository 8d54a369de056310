"""``project`` and ``steer`` interventions (DESIGN §14) during replay, measured on tiny GPT-2:
each rule's arithmetic against a hand computation from the recorded activation, clamping
inside the range is a bit-exact no-op, gates, selectors, batching and validation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from analysis.interventions import Intervention, LinearGate, Subspace
from analysis.replay import Replayer, ReplaySession, compare
from integrations.errors import InterventionError
from integrations.incident import Incident

from .test_replay import ids, record

SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def incident(tiny_gpt2: Any) -> Incident:
    x = ids(6, seed=5)
    return record(tiny_gpt2, lambda: tiny_gpt2.generate(x, max_new_tokens=2, do_sample=False),
                  sites=[SITE, "blocks.2.resid_post"])


@pytest.fixture()
def session(tiny_gpt2: Any, incident: Incident) -> ReplaySession:
    return Replayer(tiny_gpt2).load(incident)


def _direction(seed: int, d: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g)


def _after(session: ReplaySession, iv: Intervention, step: int = 0) -> torch.Tensor:
    r = session.run([iv], capture=[SITE])
    return r.activations[SITE][step]


def test_project_zero_removes_the_component(session: ReplaySession, incident: Incident) -> None:
    d = _direction(0)
    sub = Subspace.from_directions(d)
    h = incident.tensor(SITE, step=0).float()                     # [1, pos, d]
    got = _after(session, Intervention(SITE, "project", direction=sub))
    q = d / d.norm()
    want = h - (h @ q)[..., None] * q
    assert torch.allclose(got.float(), want, atol=1e-5)
    assert float((got.float() @ q).abs().max()) < 1e-4


def test_project_rank_two_and_mean(session: ReplaySession, incident: Incident) -> None:
    dirs = torch.stack([_direction(1), _direction(2)])              # [2, d]
    sub = Subspace.from_directions(dirs, to="mean", mean=torch.tensor([0.5, -1.0]))
    got = _after(session, Intervention(SITE, "project", direction=sub))
    assert torch.allclose(sub.coords(got), torch.tensor([0.5, -1.0]).expand(1, 6, 2),
                          atol=1e-4)
    # the orthogonal complement is untouched
    h = incident.tensor(SITE, step=0).float()
    rest = torch.eye(32) - sub.basis.T @ sub.basis
    assert torch.allclose(got.float() @ rest, h @ rest, atol=1e-5)


def test_clamp_inside_range_is_bit_exact(session: ReplaySession, incident: Incident) -> None:
    sub0 = Subspace.from_directions(_direction(3))
    c = torch.cat([sub0.coords(incident.tensor(SITE, step=s)).reshape(-1) for s in incident.steps(SITE)])
    wide = Subspace.from_directions(_direction(3), to="clamp", lo=c.min()[None] - 1,
                                    hi=c.max()[None] + 1)
    r = session.run([Intervention(SITE, "project", direction=wide)])
    assert all(compare(a, b).exact for a, b in zip(r.logits, session.run([]).logits)
               if a is not None and b is not None)
    tight = Subspace.from_directions(_direction(3), to="clamp", hi=c.median()[None])
    got = _after(session, Intervention(SITE, "project", direction=tight))
    assert float(tight.coords(got).max()) <= float(c.median()) + 1e-4


def test_steer_adds_and_gate_selects(session: ReplaySession, incident: Incident) -> None:
    d = _direction(4)
    h = incident.tensor(SITE, step=0).float()
    got = _after(session, Intervention(SITE, "steer", direction=d, factor=2.0))
    assert torch.allclose(got.float(), h + 2.0 * d, atol=1e-5)
    w = _direction(5)
    gate = LinearGate(weight=w, bias=0.0)
    fires = (h @ w) > 0                                              # [1, pos]
    assert 0 < int(fires.sum()) < fires.numel()      # the gate splits this incident's positions
    got = _after(session, Intervention(SITE, "steer", direction=d, factor=2.0, gate=gate))
    assert torch.allclose(got.float()[fires], (h + 2.0 * d)[fires], atol=1e-5)
    assert torch.equal(got[~fires], incident.tensor(SITE, step=0)[~fires])


def test_position_selector_and_batch_match_batch_one(session: ReplaySession,
                                                     incident: Incident) -> None:
    sub = Subspace.from_directions(_direction(6))
    last = Intervention(f"{SITE}[pos=-1]", "project", direction=sub)
    got = _after(session, last)
    h = incident.tensor(SITE, step=0)
    assert torch.equal(got[:, :-1], h[:, :-1]) and not torch.equal(got[:, -1], h[:, -1])
    other = Intervention(SITE, "steer", direction=_direction(7), factor=0.5)
    batched = session.run_batch([[last], [other], []])
    single = [session.run([last]), session.run([other]), session.run([])]
    for b, s in zip(batched, single):
        assert b.logits[-1] is not None and s.logits[-1] is not None
        assert torch.allclose(b.logits[-1], s.logits[-1], atol=1e-4)


def test_validation_errors_say_what_to_do() -> None:
    d = _direction(8)
    with pytest.raises(InterventionError, match=r"Subspace\.from_directions"):
        Intervention(SITE, "project", direction=d)
    with pytest.raises(InterventionError, match=r"\[d\] tensor"):
        Intervention(SITE, "steer")
    with pytest.raises(InterventionError, match="only for kinds 'project' and 'steer'"):
        Intervention(SITE, "zero", direction=d)
    with pytest.raises(InterventionError, match="orthonormal"):
        Subspace(basis=torch.ones(2, 32))
    with pytest.raises(InterventionError, match="needs lo= and/or hi="):
        Subspace.from_directions(d, to="clamp")
    with pytest.raises(InterventionError, match="non-finite"):
        Intervention(SITE, "steer", direction=torch.full((32,), float("nan")))


def test_wrong_dimension_is_a_clear_error(session: ReplaySession) -> None:
    iv = Intervention(SITE, "steer", direction=torch.ones(7))
    with pytest.raises(InterventionError, match="length 7"):
        session.run([iv])


def test_prompt_gate_acts_from_the_last_prompt_position_on(tiny_gpt2: Any,
                                                           incident: Incident) -> None:
    from analysis.interventions import PromptGate, applied

    h0 = incident.tensor(SITE, step=0)[0, -1].float()
    w = h0 / h0.norm()
    sub = Subspace.from_directions(_direction(9))
    on = PromptGate(site="blocks.0.resid_post", weight=w, bias=1e6)      # always fires
    off = PromptGate(site="blocks.0.resid_post", weight=w, bias=-1e6)    # never fires
    session = Replayer(tiny_gpt2).load(incident)
    plain = session.run([], capture=[SITE])
    fired = session.run([Intervention(SITE, "project", direction=sub, gate=on)], capture=[SITE])
    quiet = session.run([Intervention(SITE, "project", direction=sub, gate=off)], capture=[SITE])
    assert all(torch.equal(a, b) for a, b in zip(quiet.activations[SITE],
                                                 plain.activations[SITE]))
    first, later = fired.activations[SITE][0], fired.activations[SITE][1:]
    assert torch.equal(first[:, :-1], plain.activations[SITE][0][:, :-1])   # prompt untouched
    assert float(sub.coords(first[:, -1]).abs().max()) < 1e-4               # ...but its end
    assert all(float(sub.coords(v).abs().max()) < 1e-4 for v in later)      # and every decode
    with pytest.raises(InterventionError, match="no selector"):
        Intervention(f"{SITE}[pos=-1]", "project", direction=sub, gate=on)
    # the live hooks decide the same way
    x = incident.tensor("input_ids", step=0, kind="input")
    seen: list[torch.Tensor] = []
    hook = tiny_gpt2.transformer.h[1].register_forward_hook(lambda m, a, o: seen.append(
        (o[0] if isinstance(o, tuple) else o).detach().clone()))
    try:
        with applied(tiny_gpt2, [Intervention(SITE, "project", direction=sub, gate=on)]), \
                torch.no_grad():
            tiny_gpt2(x)
    finally:
        hook.remove()
    assert torch.allclose(seen[0], first, atol=1e-5)

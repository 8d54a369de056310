"""Interventions during replay: each kind's effect, donors, baselines, batching, verification,
position semantics and forward-pass counting — measured by running real tiny models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from analysis.interventions import DonorBaseline, Intervention, site_vectors
from analysis.replay import Replayer, ReplaySession, compare
from integrations.errors import InterventionError
from integrations.incident import Incident

from .test_replay import ids, record

SITES = ["blocks.*.resid_post", "blocks.*.mlp"]


@pytest.fixture(scope="module")
def gpt2_incident(tiny_gpt2: Any) -> Incident:
    x = ids(6, seed=11)
    return record(tiny_gpt2, lambda: tiny_gpt2.generate(x, max_new_tokens=3, do_sample=False),
                  sites=SITES)


@pytest.fixture()
def session(tiny_gpt2: Any, gpt2_incident: Incident) -> ReplaySession:
    s = Replayer(tiny_gpt2).load(gpt2_incident)
    assert s.fidelity().exact
    return s


@pytest.fixture(scope="module")
def benign(tiny_gpt2: Any) -> list[Incident]:
    out = []
    for seed in (21, 22, 23):
        x = ids(5 + seed % 3, seed=seed)
        out.append(record(tiny_gpt2, lambda x=x: tiny_gpt2.generate(  # type: ignore[misc]
            x, max_new_tokens=2, do_sample=False), sites=["blocks.*.mlp"]))
    return out


def _equal_runs(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> bool:
    return all(x is not None and y is not None and compare(x, y).exact for x, y in zip(a, b))


def test_zero_changes_downstream_not_upstream(session: ReplaySession,
                                              gpt2_incident: Incident) -> None:
    r = session.run([Intervention("blocks.1.mlp", "zero")],
                    capture=["blocks.0.resid_post", "blocks.1.mlp", "blocks.2.resid_post"])
    for step in range(3):
        assert torch.count_nonzero(r.activations["blocks.1.mlp"][step]) == 0
        up = gpt2_incident.tensor("blocks.0.resid_post", step=step)
        assert compare(r.activations["blocks.0.resid_post"][step], up).exact
        down = gpt2_incident.tensor("blocks.2.resid_post", step=step)
        assert compare(r.activations["blocks.2.resid_post"][step], down).max_abs_diff > 1e-4
    rec = gpt2_incident.tensor("logits", step=2, kind="logits")
    assert r.logits[2] is not None and not torch.equal(r.logits[2], rec)


def test_scale_one_and_self_patch_are_bit_exact_no_ops(session: ReplaySession,
                                                       gpt2_incident: Incident) -> None:
    base = session.run(capture=["blocks.2.resid_post"])
    for ivs in ([Intervention("blocks.1.mlp", "scale", factor=1.0)],
                [Intervention("blocks.*.mlp", "patch", donor=gpt2_incident)],
                [Intervention("blocks.1.attn", "patch", donor=gpt2_incident)],  # replayed donor
                [Intervention("blocks.0.mlp", "patch", value={
                    s: gpt2_incident.tensor("blocks.0.mlp", step=s) for s in range(3)})]):
        r = session.run(ivs, capture=["blocks.2.resid_post"])
        assert _equal_runs(r.logits, base.logits), ivs
        assert _equal_runs(r.activations["blocks.2.resid_post"],
                           base.activations["blocks.2.resid_post"])  # type: ignore[arg-type]
    scaled = session.run([Intervention("blocks.1.mlp", "scale", factor=2.0)],
                         capture=["blocks.1.mlp"])
    want = gpt2_incident.tensor("blocks.1.mlp", step=0) * 2.0  # prefill: upstream unchanged
    assert torch.equal(scaled.activations["blocks.1.mlp"][0], want)


def test_patch_from_counterfactual_prompt_aligned_from_the_end(
        tiny_gpt2: Any, session: ReplaySession) -> None:
    donor = ids(6, seed=99)
    donor_inc = record(tiny_gpt2, lambda: tiny_gpt2(donor).logits, sites=["blocks.0.resid_post"])
    want = donor_inc.tensor("blocks.0.resid_post", step=0)  # [1, 6, d]
    r = session.run([Intervention("blocks.0.resid_post[pos=2:6]", "patch", donor=donor)],
                    capture=["blocks.0.resid_post"])
    got = r.activations["blocks.0.resid_post"][0]
    assert torch.equal(got[:, 2:], want[:, 2:])
    assert compare(got[:, :2], session.incident.tensor("blocks.0.resid_post", step=0)[:, :2]).exact
    # A shorter donor covers only the last positions: reaching further is a clear error.
    short = [5, 6, 7]
    with pytest.raises(InterventionError, match="aligned from the end"):
        session.run([Intervention("blocks.0.resid_post", "patch", donor=short)])
    ok = session.run([Intervention("blocks.0.resid_post[pos=-3:]", "patch", donor=short)],
                     capture=["blocks.0.resid_post"])
    short_inc = record(tiny_gpt2, lambda: tiny_gpt2(torch.tensor([short])).logits,
                       sites=["blocks.0.resid_post"])
    assert torch.equal(ok.activations["blocks.0.resid_post"][0][:, 3:],
                       short_inc.tensor("blocks.0.resid_post", step=0))


def test_mean_and_resample_use_the_baseline(tiny_gpt2: Any, session: ReplaySession,
                                            benign: list[Incident]) -> None:
    baseline = DonorBaseline.from_incidents(benign, sites=["blocks.1.mlp"])
    vecs = torch.cat([site_vectors(i.tensor("blocks.1.mlp", step=s))
                      for i in benign for s in i.steps("blocks.1.mlp")])
    assert baseline.count("blocks.1.mlp") == vecs.shape[0]
    assert torch.allclose(baseline.mean("blocks.1.mlp"), vecs.mean(0), atol=1e-6)
    r = session.run([Intervention("blocks.1.mlp", "mean", donor=baseline)],
                    capture=["blocks.1.mlp"])
    for step in range(3):
        v = r.activations["blocks.1.mlp"][step]
        assert torch.equal(v, baseline.mean("blocks.1.mlp").expand_as(v))
    rng_before = torch.get_rng_state()
    a = session.run([Intervention("blocks.1.mlp", "resample", donor=baseline, seed=1)],
                    capture=["blocks.1.mlp"])
    b = session.run([Intervention("blocks.1.mlp", "resample", donor=baseline, seed=1)],
                    capture=["blocks.1.mlp"])
    c = session.run([Intervention("blocks.1.mlp", "resample", donor=baseline, seed=2)],
                    capture=["blocks.1.mlp"])
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    pool = baseline.pool("blocks.1.mlp")
    drawn = site_vectors(a.activations["blocks.1.mlp"][0])
    assert all(bool((pool == row).all(-1).any()) for row in drawn)  # every vector from the pool
    assert _equal_runs(a.logits, b.logits)
    assert not torch.equal(a.activations["blocks.1.mlp"][0], c.activations["blocks.1.mlp"][0])
    # A site the baseline incidents did not record is computed by replaying them.
    replayed = DonorBaseline.from_incidents(benign, sites=["blocks.0.attn"], model=tiny_gpt2)
    assert replayed.mean("blocks.0.attn").shape == (32,)
    with pytest.raises(InterventionError, match="model="):
        DonorBaseline.from_incidents(benign, sites=["blocks.0.attn"])


def test_batched_equals_sequential_and_verify_is_bit_exact(
        session: ReplaySession, benign: list[Incident]) -> None:
    baseline = DonorBaseline.from_incidents(benign)
    sets = [
        [],
        [Intervention("blocks.0.mlp", "zero")],
        [Intervention("blocks.1.mlp", "scale", factor=0.5),
         Intervention("blocks.2.mlp", "mean", donor=baseline)],
        [Intervention("blocks.1.mlp.post[neuron=3|7]", "zero"),
         Intervention("blocks.0.attn.z[head=1]", "scale", factor=-1.0)],
        [Intervention("blocks.2.mlp", "resample", donor=baseline, seed=5),
         Intervention("blocks.2.mlp", "scale", factor=3.0)],
        [Intervention("blocks.1.resid_post[pos=-1]", "patch", donor=[9, 8, 7, 6, 5, 4])],
    ]
    before = session.counts()
    batched = session.run_batch(sets, capture=["blocks.2.resid_post"])
    after = session.counts()
    assert after["forward_passes"] - before["forward_passes"] == 3 + 3  # + the donor prompt's run
    assert after["batched_forward_passes"] - before["batched_forward_passes"] == 3
    assert after["candidate_evaluations"] - before["candidate_evaluations"] == len(sets)
    assert after["row_forward_passes"] - before["row_forward_passes"] == 3 * len(sets) + 3
    for ivs, br in zip(sets, batched):
        assert br.batch_size == len(sets) and not br.verified
        seq = session.verify(ivs, capture=["blocks.2.resid_post"])
        assert seq.verified
        for x, y in zip(br.logits, seq.logits):
            assert x is not None and y is not None and x.shape == y.shape == (1, 97)
            assert torch.allclose(x, y, atol=1e-5, rtol=1e-5)
        again = session.run(ivs, capture=["blocks.2.resid_post"])
        assert _equal_runs(again.logits, seq.logits)  # verify == sequential, bit for bit
    # different sets really differ (the rows were not all given the same interventions)
    assert not torch.allclose(batched[0].logits[-1], batched[1].logits[-1])  # type: ignore[arg-type]
    # batched evaluation writes touched rows in place: weights and the incident stay intact
    assert session.replayer.fingerprint() == session.fingerprint_check["recorded"]
    assert session.run().fidelity.exact  # type: ignore[union-attr]
    chunks = session.run_batch(sets, max_batch=4)
    assert [len(c.interventions) for c in chunks] == [len(s) for s in sets]
    assert chunks[0].batch_size == 4 and chunks[-1].batch_size == 2


def test_unrecorded_site_and_absolute_positions(tiny_llama: Any) -> None:
    x = ids(6, seed=4)
    inc = record(tiny_llama, lambda: tiny_llama.generate(x, max_new_tokens=3, do_sample=False),
                 sites=["blocks.2.resid_post"])
    s = Replayer(tiny_llama).load(inc)
    assert s.fidelity().exact
    r = s.run([Intervention("blocks.1.attn.z[head=1]", "zero")], capture=["blocks.1.attn.z"])
    z = r.activations["blocks.1.attn.z"][0]  # [1, pos, heads, d_head]
    assert torch.count_nonzero(z[:, :, 1]) == 0 and torch.count_nonzero(z[:, :, 0]) > 0
    assert not torch.equal(r.logits[0], inc.tensor("logits", step=0, kind="logits"))  # type: ignore[arg-type]
    # [pos=2] is absolute: only the prefill call holds position 2.
    p = s.run([Intervention("blocks.0.resid_post[pos=2]", "zero")],
              capture=["blocks.0.resid_post"])
    acts = p.activations["blocks.0.resid_post"]
    assert torch.count_nonzero(acts[0][:, 2]) == 0 and torch.count_nonzero(acts[0][:, 1]) > 0
    assert all(torch.count_nonzero(a) > 0 for a in acts[1:])
    # [pos=-1] is the newest token of every step.
    q = s.run([Intervention("blocks.0.resid_post[pos=-1]", "zero")],
              capture=["blocks.0.resid_post"])
    acts = q.activations["blocks.0.resid_post"]
    assert torch.count_nonzero(acts[0][:, -1]) == 0 and torch.count_nonzero(acts[0][:, 0]) > 0
    assert all(torch.count_nonzero(a) == 0 for a in acts[1:])
    # unembed holds only the last position in generate calls (logits_to_keep=1): [pos=-1] is it.
    u = s.run([Intervention("unembed[pos=-1]", "scale", factor=0.0)])
    assert all(lg is not None and torch.count_nonzero(lg) == 0 for lg in u.logits)
    # steps= restricts the forward calls an intervention acts on.
    t = s.run([Intervention("blocks.0.resid_post", "zero", steps=(-1,))],
              capture=["blocks.0.resid_post"])
    acts = t.activations["blocks.0.resid_post"]
    assert [int(torch.count_nonzero(a) == 0) for a in acts] == [0, 0, 1]


def test_greedy_continuation_reproduces_greedy_generation(session: ReplaySession,
                                                          gpt2_incident: Incident) -> None:
    r = session.run(greedy=True)
    out = gpt2_incident.tensor("output_ids", step=2, kind="output")
    assert torch.equal(r.tokens(), out[:, -3:])
    z = session.run([Intervention("blocks.*.mlp", "scale", factor=0.0)], greedy=True)
    assert z.mode == "greedy" and z.tokens().shape == (1, 3)


def test_bert_batched_interventions(tiny_bert: Any) -> None:
    x = ids(8, seed=2)
    inc = record(tiny_bert, lambda: tiny_bert(input_ids=x, attention_mask=torch.ones_like(x),
                                              token_type_ids=torch.zeros_like(x)).logits,
                 sites=["blocks.*.mlp"])
    s = Replayer(tiny_bert).load(inc)
    sets = [[Intervention(f"blocks.{i}.mlp", "zero")] for i in range(3)] + \
        [[Intervention("unembed", "scale", factor=-1.0)]]
    rs = s.run_batch(sets)
    for ivs, r in zip(sets, rs):
        v = s.verify(ivs)
        assert torch.allclose(r.logits[0], v.logits[0], atol=1e-5)  # type: ignore[arg-type]
    base = s.run()
    flipped = s.verify(sets[3])  # batch 1: the incident's own arithmetic
    assert torch.equal(flipped.logits[0], -base.logits[0])  # type: ignore[arg-type, operator]


def test_interventions_compile_to_an_edit_the_replay_runs(session: ReplaySession,
                                                          benign: list[Incident]) -> None:
    """session.run(ivs) == the primitive running Intervention.bind_sets's edit, bit for bit."""
    baseline = DonorBaseline.from_incidents(benign)
    ivs = [Intervention("blocks.1.mlp", "scale", factor=2.0),
           Intervention("blocks.2.mlp[pos=-1]", "mean", donor=baseline),
           Intervention("blocks.0.resid_post[pos=2]", "patch", donor=[9, 8, 7, 6, 5, 4])]
    bound = Intervention.bind_sets(session, [ivs], batched=False)
    assert sorted(b.base for b in bound.sites) == ["blocks.0.resid_post", "blocks.1.mlp",
                                                   "blocks.2.mlp"]
    edited = session.run_edited(bound, capture=["blocks.2.resid_post"])
    ran = session.run(ivs, capture=["blocks.2.resid_post"])
    assert ran.interventions == tuple(ivs) and edited.interventions == ()
    assert _equal_runs(edited.logits, ran.logits)
    assert _equal_runs(edited.activations["blocks.2.resid_post"],
                       ran.activations["blocks.2.resid_post"])  # type: ignore[arg-type]
    # a hand-written edit is the same as the scale intervention (x * 2 is exact)
    double = session.run_edited(lambda site, v, *, step: v * 2.0, sites=["blocks.1.mlp"])
    scaled = session.run([Intervention("blocks.1.mlp", "scale", factor=2.0)])
    assert _equal_runs(double.logits, scaled.logits)
    with pytest.raises(InterventionError, match="holds str"):
        session.run(["blocks.1.mlp"])  # type: ignore[list-item]


def test_invalid_interventions_fail_early() -> None:
    with pytest.raises(InterventionError, match="unknown intervention kind"):
        Intervention("blocks.0.mlp", "ablate")  # type: ignore[arg-type]
    with pytest.raises(InterventionError, match="factor="):
        Intervention("blocks.0.mlp", "scale")
    with pytest.raises(InterventionError, match="Baseline"):
        Intervention("blocks.0.mlp", "mean")
    with pytest.raises(InterventionError, match="exactly one"):
        Intervention("blocks.0.mlp", "patch")
    with pytest.raises(InterventionError, match="takes no"):
        Intervention("blocks.0.mlp", "zero", donor=[1, 2])
    with pytest.raises(InterventionError, match="sets"):
        from analysis.interventions import normalize_sets

        normalize_sets([Intervention("blocks.0.mlp", "zero")])  # type: ignore[list-item]

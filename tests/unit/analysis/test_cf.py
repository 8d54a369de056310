"""Compression Forensics and the baseline detectors, on incidents recorded from real tiny models
by ``integrations.trace`` (the real Recorder); anomalies are planted with a forward hook that
adds a spike to one MLP neuron at the last prompt position."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import integrations
from analysis.cf import (
    CFBaseline,
    CompressionForensics,
    MahalanobisDetector,
    NormDetector,
)
from analysis.cf._score import (
    Z2_QUANTILE,
    benjamini_hochberg,
    empirical_p,
    loo_tail_z,
    tail_ref,
    upper_order_index,
)
from analysis.cf._units import SiteUnits, group_units, site_units
from integrations.errors import AnalysisError, FingerprintMismatchError

SITES = ["embed", "blocks.*.mlp", "blocks.*.mlp.post", "blocks.*.resid_post"]
DETECTORS = [CompressionForensics, NormDetector, MahalanobisDetector]
SPIKED = "blocks.1.mlp.post"  # the perturbed site (neuron 17 of layer 1's MLP)


def record(model: Any, n: int, *, seed: int, spike: tuple[int, int, float] | None = None,
           generate: int = 0, min_len: int = 6, max_len: int = 16) -> list[Any]:
    """Trace ``n`` requests of random-token prompts (``integrations.trace``), one incident each.

    ``spike=(layer, neuron, value)`` adds ``value`` to one GPT-2 MLP neuron at the last prompt
    position (forward hook on the MLP activation, i.e. ``blocks.{layer}.mlp.post``)."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    handle = None
    if spike is not None:
        layer, neuron, value = spike

        def hook(mod: Any, inp: Any, out: torch.Tensor) -> torch.Tensor | None:
            if out.shape[1] == 1:  # decode steps: leave alone
                return None
            out = out.clone()  # [batch, pos, d_mlp]
            out[:, -1, neuron] += value
            return out

        handle = model.transformer.h[layer].mlp.act.register_forward_hook(hook)
    incidents = []
    try:
        for i in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(3, vocab, (1, length), generator=g)  # [batch, pos]
            with integrations.trace(model, SITES, request_id=f"s{seed}-{i}") as t, \
                    torch.no_grad():
                if generate:
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=generate, do_sample=False, pad_token_id=0)
                else:
                    model(input_ids=ids)
            incidents.append(t.incident)
    finally:
        if handle is not None:
            handle.remove()
    return incidents


def wide_gpt2() -> Any:
    """A seeded 2-layer GPT-2 with d_model=128. CF's resolution is one compressed byte per token
    position (8/d bits/value); at d=32 ties at the reference maximum inflate benign flags."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                     bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> Any:
    return wide_gpt2()


@pytest.fixture(scope="module")
def data(model: Any) -> dict[str, Any]:
    return {"benign": record(model, 20, seed=1),
            "anomalous": record(model, 2, seed=2, spike=(1, 17, 10.0))}


@pytest.fixture(scope="module")
def baselines(data: dict[str, Any]) -> dict[str, CFBaseline]:
    return {d.name: d.build_baseline(data["benign"]) for d in DETECTORS}


# ------------------------------------------------------------------------- errors


def test_no_baseline_is_a_clear_error(data: dict[str, Any]) -> None:
    for det in DETECTORS:
        with pytest.raises(AnalysisError, match="build_baseline"):
            det().analyze(data["anomalous"][0])


def test_baseline_of_another_detector_is_rejected(data: dict[str, Any],
                                                  baselines: dict[str, CFBaseline]) -> None:
    with pytest.raises(AnalysisError, match="'cf' detector"):
        NormDetector(baseline=baselines["cf"]).analyze(data["benign"][0])


def test_fingerprint_mismatch(data: dict[str, Any], baselines: dict[str, CFBaseline]) -> None:
    inc = data["anomalous"][0]
    other = inc.with_manifest(model={**inc.manifest["model"], "fingerprint": "sha256:" + "0" * 64})
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        CompressionForensics(baseline=baselines["cf"]).analyze(other)
    with pytest.raises(FingerprintMismatchError, match="different models"):
        CompressionForensics.build_baseline([*data["benign"][:3], other])


def test_bad_options_and_too_few_incidents(data: dict[str, Any]) -> None:
    with pytest.raises(AnalysisError, match="at least 2"):
        NormDetector.build_baseline(data["benign"][:1])
    with pytest.raises(AnalysisError, match="unknown options"):
        NormDetector.build_baseline(data["benign"], zstd_level=3)
    with pytest.raises(AnalysisError, match="position_buckets"):
        NormDetector.build_baseline(data["benign"], position_buckets=(1, 2))


# ------------------------------------------------------------------------- detection


@pytest.mark.parametrize("det", DETECTORS, ids=lambda d: d.name)
def test_spiked_neuron_is_flagged_and_localised(det: Any, data: dict[str, Any],
                                                baselines: dict[str, CFBaseline]) -> None:
    detector = det(baseline=baselines[det.name], anomaly_threshold=2.0)
    for inc in data["anomalous"]:
        rep = detector.analyze(inc)
        assert rep.flagged and rep.score >= 2.0, rep
        top = rep.ranked_sites[0][0]
        if det is CompressionForensics:
            # CF sees a one-neuron spike mostly through the MLP's output (d_model values that
            # all grow), not the 1-in-128 neuron itself: top site is layer 1's MLP component.
            assert top in (SPIKED, "blocks.1.mlp"), rep.ranked_sites[:4]
        else:
            assert top == SPIKED, rep.ranked_sites[:4]
        # the earliest flagged site in the forward pass's order: the spiked site for the
        # per-feature detectors; never after the top site
        order = rep.execution_order
        assert order[0] == "embed" and sorted(order) == sorted(rep.sites)
        first = rep.first_flagged
        assert first is not None and rep.sites[first].flagged
        cands = rep.root_cause_candidates  # every flagged site: onsets, then echoes
        assert cands[0] == first and set(cands) == set(rep.flagged_sites)
        plain = rep.candidates(onset_ratio=0.0)  # every flagged site, in forward order
        assert [order.index(s) for s in plain] == sorted(order.index(s) for s in plain)
        assert sorted(plain) == sorted(cands)
        assert rep.to_dict()["root_cause_candidates"] == cands
        assert order.index(first) <= order.index(top)
        if det is not CompressionForensics:
            assert first == SPIKED
        worst = rep.sites[top].worst
        assert worst.kind == "last" and worst.position == inc.tensor(top).shape[1] - 1
        assert rep.sites[top].flagged
        assert [s for s, _ in rep.ranked_sites] == sorted(
            rep.sites, key=lambda s: (-rep.sites[s].score, s))
        assert all(0 < v.p <= 1 and v.p <= v.q <= 1 for v in rep.sites.values())
        # 20 baseline incidents cannot make any of these sites BH-significant: said, not hidden
        assert not rep.significant_sites
        assert any("no site can be significant" in n and "benign incidents" in n
                   for n in rep.notes), rep.notes
        # upstream of the spike nothing comes close (a single upstream site may cross z = 2: site
        # scores are calibrated so that ~2 % of benign sites do)
        upstream = [v.score for s, v in rep.sites.items() if s.startswith(("blocks.0", "embed"))]
        assert max(upstream) < rep.sites[top].score / 2, rep.ranked_sites


def test_session_duck_typing(data: dict[str, Any], baselines: dict[str, CFBaseline]) -> None:
    class Session:
        def __init__(self, incident: Any) -> None:
            self.incident = incident

    cf = CompressionForensics(baseline=baselines["cf"])
    inc = data["anomalous"][0]
    assert cf.analyze(Session(inc)).score == cf.analyze(inc).score
    with pytest.raises(AnalysisError, match="Incident"):
        cf.analyze(object())


def test_site_patterns_restrict_scoring(data: dict[str, Any],
                                        baselines: dict[str, CFBaseline]) -> None:
    rep = NormDetector(baseline=baselines["norm"], sites=["blocks.*.resid_post"]).analyze(
        data["anomalous"][0])
    assert sorted(rep.sites) == ["blocks.0.resid_post", "blocks.1.resid_post"]
    # 2 sites, 20 baseline incidents, fdr 0.2: BH can reach significance, so no such note
    rep = NormDetector(baseline=baselines["norm"], sites=["blocks.*.resid_post"],
                       fdr=0.2).analyze(data["anomalous"][0])
    assert not any("no site can be significant" in n for n in rep.notes)
    base = NormDetector.build_baseline(data["benign"], sites=["embed"])
    assert base.sites == ["embed"]


# ------------------------------------------------------------------------- baselines


def test_persistence_round_trip(tmp_path: Any, data: dict[str, Any],
                                baselines: dict[str, CFBaseline]) -> None:
    for name, base in baselines.items():
        path = tmp_path / f"{name}.npz"
        base.save(path)
        with np.load(path, allow_pickle=False) as z:  # plain arrays, no pickle needed
            assert "meta" in z.files
        loaded = CFBaseline.load(path)
        assert loaded.detector == name and loaded.sites == base.sites
        assert loaded.model_fingerprint == base.model_fingerprint
        assert loaded.sample_count == base.sample_count == 20
        assert loaded.created_at == base.created_at and loaded.format_version == 1
        np.testing.assert_array_equal(loaded.site_stats, base.site_stats)
        det = {d.name: d for d in DETECTORS}[name]
        inc = data["anomalous"][1]
        assert det(baseline=loaded).analyze(inc) == det(baseline=base).analyze(inc)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a baseline")
    with pytest.raises(AnalysisError, match="rebuild"):
        CFBaseline.load(bad)


def test_determinism_and_sampling(data: dict[str, Any], baselines: dict[str, CFBaseline]) -> None:
    again = CompressionForensics.build_baseline(data["benign"])
    np.testing.assert_array_equal(again.site_stats, baselines["cf"].site_stats)
    np.testing.assert_array_equal(again.cell_values, baselines["cf"].cell_values)
    r1 = CompressionForensics(baseline=again).analyze(data["anomalous"][0])
    r2 = CompressionForensics(baseline=baselines["cf"]).analyze(data["anomalous"][0])
    assert r1 == r2
    s1 = NormDetector.build_baseline(data["benign"], max_samples=5, seed=3)
    s2 = NormDetector.build_baseline(data["benign"], max_samples=5, seed=3)
    assert s1.sample_count == 5 and s1.incident_ids == s2.incident_ids


def test_decode_steps_are_units_at_their_absolute_position(model: Any) -> None:
    incs = record(model, 4, seed=5, generate=3, min_len=6, max_len=6)
    u = site_units(incs[0], "blocks.0.resid_post", buckets=(0, 1, 2, 4, 8))
    # 6 prompt positions, then 2 decode forward calls (the 3rd new token needs no forward)
    assert u.position.tolist() == list(range(8))
    assert u.kind.tolist() == [0] * 5 + [1] + [2] * 2
    assert u.bucket.tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    base = NormDetector.build_baseline(incs[:3], min_cell_units=2)
    rep = NormDetector(baseline=base).analyze(incs[3])
    assert rep.sites["blocks.0.resid_post"].n_units == 8
    # step_kinds restricts scoring to some step kinds, in the baseline and in the analysis
    dec = NormDetector.build_baseline(incs[:3], min_cell_units=2, step_kinds=["decode"])
    assert dec.options["step_kinds"] == ["decode"]
    drep = NormDetector(baseline=dec).analyze(incs[3])
    assert drep.sites["blocks.0.resid_post"].n_units == 2  # the 2 decode forward calls
    assert drep.sites["blocks.0.resid_post"].worst.kind == "decode"
    with pytest.raises(AnalysisError, match="step_kinds"):
        NormDetector.build_baseline(incs[:3], step_kinds=["prompt"])
    no_decode = record(model, 1, seed=9)[0]  # a plain forward: nothing of kind "decode"
    with pytest.raises(AnalysisError, match="only step kinds"):
        NormDetector(baseline=dec).analyze(no_decode)
    # CF scores (step, position-bucket) groups: [0] [1] [2,4) [4] | last [5] | decode [6] [7]
    g = group_units(u)
    assert g.offsets is not None and g.offsets.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert g.position.tolist() == [0, 1, 2, 4, 5, 6, 7] and g.kind.tolist() == [0, 0, 0, 0, 1, 2, 2]
    assert g.rows(2).shape == (2, u.vectors.shape[1]) and len(g) == 7
    cf = CompressionForensics.build_baseline(incs[:3], min_cell_units=2, unit="bucket")
    assert cf.options["unit"] == "bucket"
    crep = CompressionForensics(baseline=cf).analyze(incs[3])
    assert crep.sites["blocks.0.resid_post"].n_units == 7


def test_group_units_split_sequences_and_steps() -> None:
    """Rows of different batch sequences never share a unit, even at equal step, kind and
    bucket (two sequences decoding at the same position)."""
    vec = np.zeros((8, 3), np.float32)
    u = SiteUnits(site="s", vectors=vec,
                  kind=np.array([0, 0, 1, 0, 0, 1, 2, 2]), bucket=np.array([0, 1, 2, 0, 1, 2, 2, 2]),
                  step=np.array([0, 0, 0, 0, 0, 0, 1, 1]), position=np.array([0, 1, 2, 0, 1, 2, 3, 3]))
    g = group_units(u)
    assert g.offsets is not None and g.offsets.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    wide = SiteUnits(site="s", vectors=np.zeros((6, 2), np.float32), kind=np.zeros(6, np.int64),
                     bucket=np.array([0, 1, 2, 2, 3, 3]), step=np.zeros(6, np.int64),
                     position=np.arange(6))
    gw = group_units(wide)
    assert gw.offsets is not None and gw.offsets.tolist() == [0, 1, 2, 4, 6]
    assert group_units(gw) is gw  # idempotent


# ------------------------------------------------------------------------- statistics


def test_robust_statistics() -> None:
    ref = np.arange(1.0, 20.0)  # 19 values
    assert empirical_p(100.0, ref) == pytest.approx(1 / 20)
    assert empirical_p(0.0, ref) == 1.0
    q = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2]))
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.2])  # sorted p * 4 / rank, monotone
    r = tail_ref(np.zeros(10), floor=0.1)  # constant reference: floored, never divide by 0
    assert r.hi == r.lo == 0.1
    z = loo_tail_z(np.array([0.0, 1.0, 2.0, 3.0, np.nan, 50.0]), floor=0.1)
    assert np.isnan(z[4]) and z[5] > 10


def test_an_upper_confidence_bound_of_the_tail_for_small_baselines() -> None:
    from scipy.stats import binom

    # a sample of 50 cannot bound the 97.7th percentile at 90 %: its maximum is used
    assert upper_order_index(50, Z2_QUANTILE, 0.9) == 49
    k = upper_order_index(1000, Z2_QUANTILE, 0.9) + 1  # the k-th smallest of 1000
    assert binom.cdf(k - 1, 1000, Z2_QUANTILE) >= 0.9 > binom.cdf(k - 2, 1000, Z2_QUANTILE)
    v = np.r_[np.linspace(0.0, 1.0, 48), 5.0, 9.0]  # two far benign maxima among 50
    point, bound = tail_ref(v, floor=0.1), tail_ref(v, floor=0.1, confidence=0.9)
    assert point.median == bound.median and point.lo == bound.lo
    assert 2 * point.hi + point.median == pytest.approx(5.0)  # z = 2 at the 2nd largest
    assert 2 * bound.hi + bound.median == pytest.approx(9.0)  # ... at the largest


# ------------------------------------------------------------------------- calibration


@pytest.mark.slow
@pytest.mark.parametrize("det", DETECTORS, ids=lambda d: d.name)
def test_benign_false_positive_rate_at_default_threshold(det: Any) -> None:
    model = wide_gpt2()
    base = det.build_baseline(record(model, 30, seed=11))
    detector = det(baseline=base)  # anomaly_threshold from config: 2.0
    assert detector.anomaly_threshold == 2.0
    held_out = [detector.analyze(i) for i in record(model, 40, seed=12)]
    fpr = float(np.mean([r.flagged for r in held_out]))
    assert fpr <= 0.05, sorted(r.score for r in held_out)[-5:]
    spiked = [detector.analyze(i) for i in record(model, 5, seed=13, spike=(1, 17, 10.0))]
    assert all(r.flagged for r in spiked)
    assert min(r.score for r in spiked) > max(r.score for r in held_out)
    # incident p-values: exchangeable benign draws give (near-)uniform p, so p <= 0.1 flags
    # about 10 % of them; a spike beyond every baseline incident gets the smallest p, 1/31
    p_benign = np.array([r.p for r in held_out])
    assert np.all((p_benign >= 1 / 31) & (p_benign <= 1.0))
    assert float(np.mean(p_benign <= 0.1)) <= 0.25, np.sort(p_benign)[:8]
    assert len(set(p_benign.round(6))) > 5  # spread out, not a constant
    assert all(r.p == 1 / 31 and r.to_dict()["p"] == r.p for r in spiked)

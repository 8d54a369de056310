"""Statistics of a fix set: Wilson intervals, the permutation p-value, benign side effects.

* :func:`wilson_ci` — 95 % Wilson score interval of a flip rate,
  ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``.
* :func:`permutation_p_value` — is the fix set better than *random sets of the same size* drawn
  from the same candidates? Statistic: the replayed failure metric (lower = more fixed). ``p =
  (1 + #{random metric <= fix metric}) / (1 + n_permutations)`` (the observed set counts as one
  permutation, so p is never 0; with 99 random sets the smallest possible p is 0.01). Also
  reported: the share of random sets that flip the failure (a sham control).
* :func:`side_effects` — the same interventions replayed on **benign** incidents (never the
  failing input): mean and max KL(p_clean || p_intervened) of the next-token (or class)
  distribution over every decision position the replays produce, top-1 agreement with the
  clean replay, and accuracy against given labels for classifiers.

Example::

    lo, hi = wilson_ci(15, 16)
    se = side_effects(benign_sessions, interventions)
    se.mean_kl, se.top1_agreement
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from analysis._results import JsonRecord
from analysis.interventions import Intervention
from analysis.replay import ReplaySession

from ._oracle import Oracle, flipped

__all__ = ["PermutationTest", "SideEffects", "permutation_p_value", "side_effects", "wilson_ci"]


def wilson_ci(k: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes in ``n`` trials (scipy)."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class PermutationTest(JsonRecord):
    """Result of :func:`permutation_p_value`."""

    p_value: float
    n_permutations: int
    fix_metric: float
    random_metrics_median: float
    random_flip_rate: float
    set_size: int


def permutation_p_value(oracle: Oracle, fix: Sequence[int], *, n_permutations: int = 99,
                        seed: int = 0) -> PermutationTest:
    """Fix set vs ``n_permutations`` random same-size candidate sets (module doc). The fix set
    is evaluated in the same batched replays as the random sets (same arithmetic)."""
    n, k = oracle.n, len(fix)
    rng = random.Random(seed)
    sets = [sorted(rng.sample(range(n), k)) for _ in range(n_permutations)]
    metrics = oracle.evaluate_batch([list(fix), *sets])
    fix_m, rand = metrics[0], metrics[1:]
    le = sum(1 for m in rand if m <= fix_m)
    srt = sorted(rand)
    med = srt[len(srt) // 2] if srt else float("nan")
    return PermutationTest(p_value=(1 + le) / (1 + len(rand)), n_permutations=len(rand),
                           fix_metric=fix_m, random_metrics_median=med,
                           random_flip_rate=sum(flipped(m) for m in rand) / max(len(rand), 1),
                           set_size=k)


@dataclass(frozen=True)
class SideEffects(JsonRecord):
    """What the fix does to benign traffic (module doc). ``n_incidents`` benign incidents,
    ``n_positions`` decision positions compared; ``accuracy``/``accuracy_clean`` only with
    labels (classifiers)."""

    mean_kl: float
    max_kl: float
    top1_agreement: float
    n_incidents: int
    n_positions: int
    forward_passes: int
    accuracy: float | None = None
    accuracy_clean: float | None = None


def side_effects(sessions: Sequence[ReplaySession], interventions: Sequence[Intervention], *,
                 labels: Sequence[int] | None = None,
                 clean_cache: dict[int, list[torch.Tensor | None]] | None = None) -> SideEffects:
    """Replay each benign session clean and with ``interventions`` (batch 1) and compare
    (module doc). ``clean_cache`` (keyed by ``id(session)``) reuses clean replays."""
    if labels is not None and len(labels) != len(sessions):
        raise ValueError(f"{len(labels)} labels for {len(sessions)} benign incidents")
    kls: list[float] = []
    agree = 0
    correct = correct_clean = 0
    passes = 0
    for i, s in enumerate(sessions):
        cache = clean_cache if clean_cache is not None else {}
        if id(s) not in cache:
            cache[id(s)] = s.run().logits
            passes += 1
        clean = cache[id(s)]
        fixed = s.verify(list(interventions)).logits
        passes += 1
        for a, b in zip(clean, fixed):
            if a is None or b is None:
                continue
            lp = torch.log_softmax(a.float(), -1)  # [batch, vocab]
            lq = torch.log_softmax(b.float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)  # [batch]
            kls.extend(float(x) for x in kl.clamp_min(0.0))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        if labels is not None:
            last_clean, last_fixed = clean[-1], fixed[-1]
            assert last_clean is not None and last_fixed is not None
            correct_clean += int(int(last_clean.argmax(-1)[0]) == int(labels[i]))
            correct += int(int(last_fixed.argmax(-1)[0]) == int(labels[i]))
    n_pos = len(kls)
    return SideEffects(
        mean_kl=sum(kls) / n_pos if n_pos else float("nan"),
        max_kl=max(kls) if kls else float("nan"),
        top1_agreement=agree / n_pos if n_pos else float("nan"),
        n_incidents=len(sessions), n_positions=n_pos, forward_passes=passes,
        accuracy=None if labels is None else correct / len(sessions),
        accuracy_clean=None if labels is None else correct_clean / len(sessions))

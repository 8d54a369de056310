"""CausalCCA: find a minimal set of interventions that makes a replayed failure go away.

Pipeline of :meth:`CausalCCA.search_fix_set` (DESIGN §8), every claim a real replay:

1. bind the failure (:mod:`._failure`) and check that the clean replay fails (metric > 0);
2. rank the candidates: attribution patching, one forward + one backward
   (:mod:`._attribution`; ``rank_by="none"``: their own order), blended with CF ranks when
   ``guided_by`` is given — a ranking reorders, it never removes a candidate;
3. search (``search_strategy``): ``greedy`` grows a set along the ranking — galloping/binary
   search over the prefix length, batched — and narrows it by adaptive group testing with real
   replays (:func:`~._group_testing.progressive_reduce`), ~k·log2 N replays for k causes among
   N whatever the ranking says; if that fails it falls back to the same group testing in the
   candidates' own order, then to delta debugging, all within ``max_forward_passes`` (default
   N, the exhaustive single-candidate count; :mod:`._greedy`); ``beam``; ``exhaustive`` (the
   oracle);
4. minimise to a 1-minimal set by verified removals at the incident's own shapes; the metric
   without each element is its necessity;
5. flip rate over failing variants (Wilson 95 %); while it is below ``early_stop_threshold`` and
   the set is smaller than ``max_fix_set_size``, grow it with the elements a still-failing
   variant needs (same group testing on that variant);
6. side effects on the benign set, and a permutation p-value against random same-size sets;
7. IS-C (``interactions=True``, sets of 2+): the pairwise Shapley–Taylor interaction of the
   set's components over the incident and its failing variants (:mod:`._interactions`).

If nothing within ``max_fix_set_size`` flips, or the budget runs out first, the result says so
(``flip=False``, empty ``interventions``, ``reason`` with each phase's outcome and the passes
used) — no fallback sets, no estimated rates; a result that cost more passes than the budget
says so in ``notes``.

Example::

    cca = CausalCCA(max_fix_set_size=8, search_strategy="greedy")
    fix = cca.search_fix_set(session, guided_by=cf_report, benign=benign_incidents,
                             failure=Failure.token(7),
                             candidates=["blocks.*.mlp.post[neuron=*]"], intervention="mean")
    fix.flip, fix.sites, fix.flip_rate, fix.flip_rate_ci, fix.side_effects.mean_kl
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from analysis.interventions import DonorBaseline, Intervention
from analysis.replay import ReplaySession
from integrations.errors import AnalysisError, ConfigError

from ._attribution import attribution_scores, blend_ranking
from ._candidates import candidate_interventions, candidate_sites
from ._failure import BoundFailure, Failure, decode, failing
from ._fixset import FixSet, Necessity, VariantResult
from ._greedy import greedy_search
from ._group_testing import Reduction, minimise
from ._growth import grow_over_variants, variant_oracles, variant_results
from ._interactions import pairwise_interactions
from ._oracle import SessionOracle, flipped
from ._stats import permutation_p_value, side_effects, wilson_ci
from ._strategies import beam_search, exhaustive_search
from ._variants import as_session

__all__ = ["CausalCCA"]

#: The smallest default forward-pass budget of the greedy search (see ``max_forward_passes``).
MIN_DEFAULT_BUDGET = 32

_STRATEGIES = ("greedy", "beam", "exhaustive")
#: How candidates are ranked before the search (``none``: in their given order, no gradient).
_RANKINGS = ("attribution", "none")


class CausalCCA:
    """Causal minimal fix-set search (module doc).

    Options left as ``None`` come from ``config`` (a ``ForensicsConfig`` or its
    ``modules.cca`` section; default :func:`integrations.config.load_config`):
    ``max_fix_set_size`` (largest set reported), ``search_strategy`` (greedy | beam |
    exhaustive), ``early_stop_threshold`` (stop growing once the verified flip rate over variants
    reaches it). Others: ``n_variants`` default perturbations, ``n_permutations`` random sets for
    the p-value (99: smallest possible p is 0.01), ``beam_width``, ``max_batch`` sets per
    batched forward, ``cf_weight`` of CF ranks in the blend, ``max_exhaustive_sets``, ``seed``.
    ``max_forward_passes``: the greedy search's budget of replays (search, 1-minimality and
    necessity; not the statistics) — default the exhaustive single-candidate count N (at least
    ``MIN_DEFAULT_BUDGET`` = 32: below that, group testing plus its own verification replays
    costs about what patching each candidate does), so the search never costs more than
    patching every candidate once, beyond that floor, without saying so (the
    ``beam`` and ``exhaustive`` strategies are not bounded by it; their result notes when they
    cost more). ``rank_by``: ``attribution`` (default: attribution patching, one forward + one
    backward) or ``none`` (the candidates' own order); ``guided_by`` reorders either, never
    removes a candidate. ``interactions``: measure IS-C on fix sets of 2 or more components
    (``FixSet.interactions``; its replays count in ``statistics_forward_passes``).

    Example::

        fix = CausalCCA(search_strategy="exhaustive", max_fix_set_size=2).search_fix_set(
            session, benign=benign, failure=Failure.label(1), intervention="zero")
    """

    def __init__(self, *, max_fix_set_size: int | None = None,
                 search_strategy: str | None = None, early_stop_threshold: float | None = None,
                 config: Any = None, n_variants: int = 16, n_permutations: int = 99,
                 beam_width: int = 4, max_batch: int = 64, cf_weight: float = 0.5,
                 max_exhaustive_sets: int = 200_000, max_forward_passes: int | None = None,
                 rank_by: str = "attribution", interactions: bool = True,
                 seed: int = 0) -> None:
        section: Any = _cca_section(config) if None in (
            max_fix_set_size, search_strategy, early_stop_threshold) else None
        self.max_fix_set_size = int(max_fix_set_size if max_fix_set_size is not None
                                    else section.max_fix_set_size)
        self.search_strategy = str(search_strategy if search_strategy is not None
                                   else section.search_strategy)
        self.early_stop_threshold = float(early_stop_threshold if early_stop_threshold is not None
                                          else section.early_stop_threshold)
        if self.max_fix_set_size < 1:
            raise ConfigError(f"max_fix_set_size={self.max_fix_set_size}: use >= 1")
        if self.search_strategy not in _STRATEGIES:
            raise ConfigError(f"search_strategy={self.search_strategy!r}: use one of "
                              f"{', '.join(_STRATEGIES)}")
        if not 0.0 < self.early_stop_threshold <= 1.0:
            raise ConfigError(f"early_stop_threshold={self.early_stop_threshold}: use 0 < t <= 1")
        self.n_variants = int(n_variants)
        self.n_permutations = int(n_permutations)
        self.beam_width = int(beam_width)
        self.max_batch = int(max_batch)
        self.cf_weight = float(cf_weight)
        self.max_exhaustive_sets = int(max_exhaustive_sets)
        if max_forward_passes is not None and (isinstance(max_forward_passes, bool) or int(
                max_forward_passes) < 1):
            raise ConfigError(f"max_forward_passes={max_forward_passes!r}: use an int >= 1, or "
                              "None for the exhaustive single-candidate count")
        self.max_forward_passes = None if max_forward_passes is None else int(max_forward_passes)
        if rank_by not in _RANKINGS:
            raise ConfigError(f"rank_by={rank_by!r}: use one of {', '.join(_RANKINGS)}")
        self.rank_by = rank_by
        self.interactions = bool(interactions)
        self.seed = int(seed)

    def search_fix_set(self, session: ReplaySession, *, guided_by: Any = None,
                       benign: Sequence[Any] | None = None,
                       failure: Failure | Callable[..., Any] | None = None,
                       candidates: Sequence[str] | None = None, intervention: str = "mean",
                       variants: Sequence[Any] | None = None,
                       baseline: DonorBaseline | None = None, donor: Any = None,
                       factor: float | None = None, tokenizer: Any = None,
                       benign_labels: Sequence[int] | None = None) -> FixSet:
        """Search a minimal fix set for the failing ``session`` (module doc).

        ``benign``: benign incidents / sessions / prompt ids — side effects are measured on them
        and, for ``mean``/``resample``, the baseline is built from them unless ``baseline=`` (a
        :class:`~analysis.interventions.DonorBaseline`) is given. ``candidates``: site patterns
        (``*`` selectors expand, e.g. ``blocks.*.mlp.post[neuron=*]``; default attention and MLP
        outputs of every block). ``intervention``: patch (``donor=`` an incident or prompt ids;
        default the first benign incident) | mean | zero | resample | scale (``factor=``).
        ``variants``: failing variants (incidents / sessions / prompt ids); default
        ``n_variants`` single-token substitutions (see :mod:`._variants`). ``benign_labels``:
        true labels of the benign inputs (classifier accuracy).
        """
        if not isinstance(session, ReplaySession):
            raise AnalysisError(f"search_fix_set takes a ReplaySession (Replayer(model).load("
                                f"incident)), got {type(session).__name__}")
        spec = Failure.coerce(failure, session.incident, tokenizer=tokenizer)
        bound = spec.bind(session, tokenizer=tokenizer)
        sites = candidate_sites(session, candidates)
        benign_sessions = [as_session(b, template=session, name=f"benign{i}")
                           for i, b in enumerate(benign or [])]
        ivs = candidate_interventions(sites, intervention, benign_sessions, baseline=baseline,
                                      donor=donor, factor=factor, model=session.model)
        run = _SearchRun(self, session, spec, bound, sites, ivs, intervention=intervention,
                         benign=benign_sessions, tokenizer=tokenizer)
        return run.execute(guided_by=guided_by, variants=variants, benign_labels=benign_labels)


class _SearchRun:
    """One :meth:`CausalCCA.search_fix_set` call: its state, and the pipeline's steps 2-6
    (module doc) as methods. Every claim is a replay through :attr:`oracle` (or the session);
    the :class:`FixSet` is filled as the steps go."""

    def __init__(self, cca: CausalCCA, session: ReplaySession, spec: Failure,
                 bound: BoundFailure, sites: list[str], ivs: list[Intervention], *,
                 intervention: str, benign: list[ReplaySession], tokenizer: Any) -> None:
        self.cca, self.session, self.spec, self.bound = cca, session, spec, bound
        self.sites, self.ivs, self.benign, self.tokenizer = sites, ivs, benign, tokenizer
        self.calls0 = session.forward_passes
        self.oracle = SessionOracle(session, bound, ivs, max_batch=cca.max_batch)
        #: the search's forward-pass budget (CausalCCA.max_forward_passes; default N, at
        #: least MIN_DEFAULT_BUDGET so a handful of candidates still affords verification)
        self.budget = cca.max_forward_passes or max(len(sites), MIN_DEFAULT_BUDGET)
        self.fs = FixSet(flip=False, interventions=[], reason="", failure=bound.description,
                         incident_id=session.incident.id, strategy=cca.search_strategy,
                         intervention_kind=intervention, n_candidates=len(sites),
                         metric_before=float("nan"), exhaustive_forward_passes=len(sites))

    def execute(self, *, guided_by: Any, variants: Sequence[Any] | None,
                benign_labels: Sequence[int] | None) -> FixSet:
        """Steps 1-6 (module doc); every early exit says why (``flip=False``, ``reason``)."""
        cca, fs = self.cca, self.fs
        fs.metric_before = before = self.oracle.verify([])
        if not failing(before):
            return self._done(f"the clean replay does not fail ({self.bound.description}: "
                              f"metric {before:+.4g} <= 0); nothing to fix — check the failure "
                              "predicate")
        order = self._rank(guided_by)
        core = self._core(order)
        if isinstance(core, str):
            return self._done(core)
        items, without = core
        roles = {i: "core" for i in items}
        v_oracles, tried, v_passes = variant_oracles(
            self.session, self.spec, self.bound, self.ivs, variants, self.benign, self.tokenizer,
            n_variants=cca.n_variants, seed=cca.seed, max_batch=cca.max_batch)
        results = variant_results(v_oracles, items)
        items, results = grow_over_variants(v_oracles, order, items, roles, results, fs,
                                            threshold=cca.early_stop_threshold,
                                            max_size=cca.max_fix_set_size)
        failed = self._necessity(items, without, roles)
        if failed:
            return self._done(failed)
        if self.spec.kind == "text":
            self._greedy_check()
        self._flip_rate(results, tried)
        stats = sum(o.passes for o in v_oracles) + v_passes
        search_passes = self._statistics(items, benign_labels, stats)
        if cca.interactions and len(items) >= 2:
            fs.interactions = pairwise_interactions(
                [self.oracle, *v_oracles], items, sites=[self.sites[i] for i in items],
                seed=cca.seed)
            fs.statistics_forward_passes += fs.interactions.forward_passes
        fs.reason = "verified: the set flips the failure at the incident's own shapes"
        fs.forward_passes = search_passes
        self._budget_note()
        fs.model_calls = (self.session.forward_passes - self.calls0
                          + sum(o.model_calls for o in v_oracles)
                          + sum(s.forward_passes for s in self.benign))
        return fs

    def _rank(self, guided_by: Any) -> list[int]:
        """Step 2: attribution patching (one forward + one backward), blended with CF; with
        ``rank_by="none"`` the candidates' own order (blended with CF)."""
        fs = self.fs
        if self.cca.rank_by == "none":
            order = blend_ranking([0.0] * len(self.ivs), self.sites, guided_by=guided_by,
                                  cf_weight=self.cca.cf_weight)
            fs.ranking = [(self.sites[i], 0.0) for i in order]
            return order
        try:
            est, _ = attribution_scores(self.session, self.bound, self.ivs)
            fs.gradient_passes = 1
            self.oracle.passes += 1  # the attribution forward (its backward is gradient_passes)
        except (RuntimeError, AnalysisError) as err:
            est = [0.0] * len(self.ivs)
            fs.notes.append(f"attribution ranking unavailable ({err}); candidates kept in "
                            "the given order")
        order = blend_ranking(est, self.sites, guided_by=guided_by,
                              cf_weight=self.cca.cf_weight)
        fs.ranking = [(self.sites[i], est[i]) for i in order]
        return order

    def _core(self, order: list[int]) -> tuple[list[int], dict[int, float]] | str:
        """Steps 3-4: search a flipping set, confirm it at batch 1, make it 1-minimal; the
        1-minimal set and each element's metric without it — or why there is none."""
        red = self._search(order)
        self.fs.trace.extend(red.trace)
        if red.items is None:
            return red.reason
        if red.phase not in ("", "ranked"):
            self.fs.notes.append(f"the ranked search found no set; the {red.phase} fallback "
                                 f"did ({self.oracle.passes} forward passes so far)")
        m = self.oracle.verify(red.items)
        if not flipped(m):
            return (f"the set found in batched replays ({len(red.items)} interventions) does "
                    f"not flip the failure at the incident's own shapes (metric {m:+.4g})")
        core, without = minimise(self.oracle, red.items)
        if len(core) > self.cca.max_fix_set_size:
            return (f"the smallest flipping set found has {len(core)} interventions, more than "
                    f"max_fix_set_size={self.cca.max_fix_set_size}")
        return core, without

    def _search(self, order: list[int]) -> Reduction:
        """Step 3 with the configured strategy (greedy: ranked group testing, then unguided
        fallbacks, within the pass budget less a reserve for the 1-minimality proof)."""
        cca, oracle = self.cca, self.oracle
        k = cca.max_fix_set_size
        if cca.search_strategy == "exhaustive":
            return exhaustive_search(oracle, max_size=k, max_sets=cca.max_exhaustive_sets)
        if cca.search_strategy == "beam":
            return beam_search(oracle, max_size=k, beam_width=cca.beam_width)
        return greedy_search(oracle, ranked=order, unguided=list(range(oracle.n)), max_size=k,
                             limit=max(self.budget - (k + 1), oracle.passes))

    def _necessity(self, final: list[int], without: dict[int, float],
                   roles: dict[int, str]) -> str | None:
        """The final set at batch 1 and without each element (verified); None, or why the
        grown set does not flip."""
        fs, oracle = self.fs, self.oracle
        nec_without = dict(without)
        after = oracle.verify(final)
        for e in final:
            if e not in nec_without:
                nec_without[e] = oracle.verify([x for x in final if x != e])
        fs.flip = flipped(after)
        if not fs.flip:  # cannot happen for a monotone model; never hide it
            return (f"the grown set does not flip the incident at its own shapes (metric "
                    f"{after:+.4g})")
        fs.metric_after = after
        fs.interventions = [self.ivs[i] for i in final]
        fs.necessity = [Necessity(site=self.sites[i], metric_without=nec_without[i],
                                  delta=nec_without[i] - after,
                                  flips_without=flipped(nec_without[i]), role=roles[i])
                        for i in final]
        # core elements: removal un-flips the incident; growth elements survived pruning
        # (removing one lowers the variant flip rate), see grow_over_variants
        fs.one_minimal = all(not n.flips_without for n in fs.necessity if n.role == "core")
        return None

    def _greedy_check(self) -> None:
        """For text failures: does a free greedy continuation with the fix still produce it?"""
        fs, spec = self.fs, self.spec
        tok = self.tokenizer if self.tokenizer is not None else spec.tokenizer
        r = self.session.verify(fs.interventions, greedy=True)
        text = decode(tok, [int(t) for t in r.tokens()[0].tolist()])
        fs.greedy_output = text
        fs.greedy_check = spec.text is not None and spec.text not in text
        fs.notes.append(f"greedy continuation with the fix (replayed): {text!r}")

    def _flip_rate(self, results: list[VariantResult], tried: int) -> None:
        """Step 5's measurement: the share of failing variants the set flips (Wilson 95 %)."""
        fs = self.fs
        fs.variants = results
        fs.variants_tried = tried
        if results:
            k = sum(r.flipped for r in results)
            fs.flip_rate = k / len(results)
            fs.flip_rate_ci = wilson_ci(k, len(results))
        else:
            fs.notes.append(f"no failing variant ({tried} tried): flip rate not measured")

    def _statistics(self, final: list[int], benign_labels: Sequence[int] | None,
                    stats: int) -> int:
        """Step 6: side effects on the benign set and the permutation p-value; returns the
        search's replays (``forward_passes``) and sets ``statistics_forward_passes`` (``stats``
        carries the variants' replays)."""
        fs, oracle = self.fs, self.oracle
        if self.benign:
            se = side_effects(self.benign, fs.interventions, labels=benign_labels)
            fs.side_effects = se
            stats += se.forward_passes
        else:
            fs.notes.append("no benign inputs: side effects not measured (pass benign=)")
        search_passes = oracle.passes
        if self.cca.n_permutations > 0 and len(self.sites) > len(final):
            fs.permutation = permutation_p_value(oracle, final,
                                                 n_permutations=self.cca.n_permutations,
                                                 seed=self.cca.seed)
        fs.statistics_forward_passes = stats + oracle.passes - search_passes
        return search_passes

    def _done(self, reason: str) -> FixSet:
        """An honest "no fix set": ``flip=False``, no interventions, ``reason``."""
        fs = self.fs
        fs.reason = reason
        fs.flip = False
        fs.interventions = []
        fs.necessity = []
        fs.forward_passes = self.oracle.passes
        fs.model_calls = self.session.forward_passes - self.calls0
        self._budget_note()
        return fs

    def _budget_note(self) -> None:
        """Say so whenever the search used more replays than its budget (the exhaustive
        single-candidate count by default)."""
        fs, used = self.fs, self.fs.forward_passes
        if used <= self.budget:
            return
        why = ("it is not bounded by the budget" if self.cca.search_strategy != "greedy" else
               "proving 1-minimality and necessity of the set found took the rest")
        fs.notes.append(f"used {used} forward passes, more than the budget of {self.budget} "
                        f"(max_forward_passes; exhaustive single-candidate patching: "
                        f"{fs.exhaustive_forward_passes}): strategy {self.cca.search_strategy!r}"
                        f", {why}")


def _cca_section(config: Any) -> Any:
    if config is None:
        from integrations.config import load_config

        config = load_config()
    modules = getattr(config, "modules", None)
    section = getattr(modules, "cca", None) if modules is not None else config
    if section is None or not hasattr(section, "max_fix_set_size"):
        raise ConfigError(f"config= takes a ForensicsConfig or its modules.cca section, got "
                          f"{type(config).__name__}")
    return section

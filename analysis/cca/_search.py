"""CausalCCA: find a minimal set of interventions that makes a replayed failure go away.

Pipeline of :meth:`CausalCCA.search_fix_set` (DESIGN §8), every claim a real replay:

1. bind the failure (:mod:`._failure`) and check that the clean replay fails (metric > 0);
2. rank the candidates: attribution patching, one forward + one backward
   (:mod:`._attribution`), blended with CF ranks when ``guided_by`` is given;
3. search (``search_strategy``): ``greedy`` grows a set along the ranking — galloping/binary
   search over the prefix length, batched — and narrows it by adaptive group testing with real
   replays (:func:`~._group_testing.progressive_reduce`, delta debugging as fallback), ~k·log2 N
   replays for k causes among N whatever the ranking says; ``beam``; ``exhaustive`` (the oracle);
4. minimise to a 1-minimal set by verified removals at the incident's own shapes; the metric
   without each element is its necessity;
5. flip rate over failing variants (Wilson 95 %); while it is below ``early_stop_threshold`` and
   the set is smaller than ``max_fix_set_size``, grow it with the elements a still-failing
   variant needs (same group testing on that variant);
6. side effects on the benign set, and a permutation p-value against random same-size sets.

If nothing within ``max_fix_set_size`` flips, the result says so (``flip=False``, empty
``interventions``, ``reason``) — no fallback sets, no estimated rates.

Example::

    cca = CausalCCA(max_fix_set_size=8, search_strategy="greedy")
    fix = cca.search_fix_set(session, guided_by=cf_report, benign=benign_incidents,
                             failure=Failure.token(7),
                             candidates=["blocks.*.mlp.post[neuron=*]"], intervention="mean")
    fix.flip, fix.sites, fix.flip_rate, fix.flip_rate_ci, fix.side_effects.mean_kl
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from integrations.errors import AnalysisError, ConfigError

from ._attribution import attribution_scores, blend_ranking
from ._failure import BoundFailure, Failure, failing
from ._fixset import FixSet, Necessity, VariantResult
from ._group_testing import Reduction, ddmin, minimise, progressive_reduce
from ._oracle import SessionOracle, flipped
from ._stats import permutation_p_value, side_effects, wilson_ci
from ._strategies import beam_search, exhaustive_search
from ._variants import as_session, prompt_tokens, substitution_variants

if TYPE_CHECKING:
    from analysis.interventions import Intervention
    from analysis.replay import ReplaySession

__all__ = ["DEFAULT_CANDIDATES", "CausalCCA"]

DEFAULT_CANDIDATES: tuple[str, ...] = ("blocks.*.attn", "blocks.*.mlp")
_STRATEGIES = ("greedy", "beam", "exhaustive")


class CausalCCA:
    """Causal minimal fix-set search (module doc).

    Options left as ``None`` come from ``config`` (a ``ForensicsConfig`` or its
    ``modules.cca`` section; default :func:`integrations.config.load_config`):
    ``max_fix_set_size`` (largest set reported), ``search_strategy`` (greedy | beam |
    exhaustive), ``early_stop_threshold`` (stop growing once the verified flip rate over variants
    reaches it). Others: ``n_variants`` default perturbations, ``n_permutations`` random sets for
    the p-value (99: smallest possible p is 0.01), ``beam_width``, ``max_batch`` sets per
    batched forward, ``cf_weight`` of CF ranks in the blend, ``max_exhaustive_sets``, ``seed``.

    Example::

        fix = CausalCCA(search_strategy="exhaustive", max_fix_set_size=2).search_fix_set(
            session, benign=benign, failure=Failure.label(1), intervention="zero")
    """

    def __init__(self, *, max_fix_set_size: int | None = None,
                 search_strategy: str | None = None, early_stop_threshold: float | None = None,
                 config: Any = None, n_variants: int = 16, n_permutations: int = 99,
                 beam_width: int = 4, max_batch: int = 64, cf_weight: float = 0.5,
                 max_exhaustive_sets: int = 200_000, seed: int = 0) -> None:
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
        self.seed = int(seed)

    # ------------------------------------------------------------------ public
    def search_fix_set(self, session: ReplaySession, *, guided_by: Any = None,
                       benign: Sequence[Any] | None = None,
                       failure: Failure | Callable[..., Any] | None = None,
                       candidates: Sequence[str] | None = None, intervention: str = "mean",
                       variants: Sequence[Any] | None = None, baseline: Any = None,
                       donor: Any = None, factor: float | None = None, tokenizer: Any = None,
                       benign_labels: Sequence[int] | None = None) -> FixSet:
        """Search a minimal fix set for the failing ``session`` (module doc).

        ``benign``: benign incidents / sessions / prompt ids — side effects are measured on them
        and, for ``mean``/``resample``, the baseline is built from them unless ``baseline=`` (an
        :class:`~analysis.interventions.Baseline`) is given. ``candidates``: site patterns
        (``*`` selectors expand, e.g. ``blocks.*.mlp.post[neuron=*]``; default attention and MLP
        outputs of every block). ``intervention``: patch (``donor=`` an incident or prompt ids;
        default the first benign incident) | mean | zero | resample | scale (``factor=``).
        ``variants``: failing variants (incidents / sessions / prompt ids); default
        ``n_variants`` single-token substitutions (see :mod:`._variants`). ``benign_labels``:
        true labels of the benign inputs (classifier accuracy).
        """
        from analysis.replay import ReplaySession
        from integrations.sites import resolve_sites

        if not isinstance(session, ReplaySession):
            raise AnalysisError(f"search_fix_set takes a ReplaySession (Replayer(model).load("
                                f"incident)), got {type(session).__name__}")
        spec = Failure.coerce(failure, session.incident, tokenizer=tokenizer)
        bound = spec.bind(session, tokenizer=tokenizer)
        model = session.model
        patterns = list(candidates) if candidates else list(DEFAULT_CANDIDATES)
        seq_len = sum(c.seq_len for c in session.plan.steps)  # [pos=*] over every position
        sites = list(dict.fromkeys(b.site for b in resolve_sites(model, patterns,
                                                                 seq_len=seq_len)))
        if not sites:
            raise AnalysisError(f"candidates {patterns} resolve to no site on this model")
        benign_sessions = [as_session(b, template=session, name=f"benign{i}")
                           for i, b in enumerate(benign or [])]
        ivs = self._interventions(sites, intervention, benign_sessions, baseline=baseline,
                                  donor=donor, factor=factor, model=model)
        calls0 = session.forward_passes
        oracle = SessionOracle(session, bound, ivs, max_batch=self.max_batch)
        base = FixSet(flip=False, interventions=[], reason="", failure=bound.description,
                      incident_id=session.incident.id, strategy=self.search_strategy,
                      intervention_kind=intervention, n_candidates=len(sites),
                      metric_before=float("nan"), exhaustive_forward_passes=len(sites))
        before = oracle.verify([])
        base.metric_before = before
        if not failing(before):
            return self._done(base, oracle, calls0, reason=(
                f"the clean replay does not fail ({bound.description}: metric {before:+.4g} "
                "<= 0); nothing to fix — check the failure predicate"))
        # 2. ranking
        try:
            est, _ = attribution_scores(session, bound, ivs)
            base.gradient_passes = 1
            oracle.passes += 1  # the attribution forward (its backward is gradient_passes)
        except (RuntimeError, AnalysisError) as err:
            est = [0.0] * len(ivs)
            base.notes.append(f"attribution ranking unavailable ({err}); candidates kept in "
                              "the given order")
        order = blend_ranking(est, sites, guided_by=guided_by, cf_weight=self.cf_weight)
        base.ranking = [(sites[i], est[i]) for i in order]
        # 3. search
        red = self._search(oracle, order)
        base.trace.extend(red.trace)
        if red.items is None:
            return self._done(base, oracle, calls0, reason=red.reason)
        m = oracle.verify(red.items)
        if not flipped(m):
            return self._done(base, oracle, calls0, reason=(
                f"the set found in batched replays ({len(red.items)} interventions) does not "
                f"flip the failure at the incident's own shapes (metric {m:+.4g})"))
        # 4. minimise (verified)
        core, without = minimise(oracle, red.items)
        if len(core) > self.max_fix_set_size:
            return self._done(base, oracle, calls0, reason=(
                f"the smallest flipping set found has {len(core)} interventions, more than "
                f"max_fix_set_size={self.max_fix_set_size}"))
        roles = {i: "core" for i in core}
        # 5. variants (+ growth until early_stop_threshold)
        v_oracles, tried, v_passes = self._variant_oracles(session, spec, bound, ivs, variants,
                                                           benign_sessions, tokenizer)
        items = list(core)
        results = self._variant_results(v_oracles, items)
        items, results = self._grow(oracle, v_oracles, order, items, roles, results, base)
        # necessity of every element (verified)
        final, nec_without = items, dict(without)
        after = oracle.verify(final)
        for e in final:
            if e not in nec_without:
                nec_without[e] = oracle.verify([x for x in final if x != e])
        base.flip = flipped(after)
        if not base.flip:  # cannot happen for a monotone model; never hide it
            return self._done(base, oracle, calls0, reason=(
                f"the grown set does not flip the incident at its own shapes (metric "
                f"{after:+.4g})"))
        base.metric_after = after
        base.interventions = [ivs[i] for i in final]
        base.necessity = [Necessity(site=sites[i], metric_without=nec_without[i],
                                    delta=nec_without[i] - after,
                                    flips_without=flipped(nec_without[i]), role=roles[i])
                          for i in final]
        # core elements: removal un-flips the incident; growth elements survived pruning
        # (removing one lowers the variant flip rate), see _grow
        base.one_minimal = all(not n.flips_without for n in base.necessity if n.role == "core")
        if spec.kind == "text":
            self._greedy_check(session, spec, tokenizer, base)
        base.variants = results
        base.variants_tried = tried
        if results:
            k = sum(r.flipped for r in results)
            base.flip_rate = k / len(results)
            base.flip_rate_ci = wilson_ci(k, len(results))
        else:
            base.notes.append(f"no failing variant ({tried} tried): flip rate not measured")
        stats = sum(o.passes for o in v_oracles) + v_passes
        # 6. side effects + permutation test
        if benign_sessions:
            se = side_effects(benign_sessions, base.interventions, labels=benign_labels)
            base.side_effects = se
            stats += se.forward_passes
        else:
            base.notes.append("no benign inputs: side effects not measured (pass benign=)")
        search_passes = oracle.passes
        if self.n_permutations > 0 and len(sites) > len(final):
            base.permutation = permutation_p_value(oracle, final,
                                                   n_permutations=self.n_permutations,
                                                   seed=self.seed)
        stats += oracle.passes - search_passes
        base.statistics_forward_passes = stats
        out = self._done(base, oracle, calls0, reason="verified: the set flips the failure at "
                         "the incident's own shapes", keep=True)
        out.forward_passes = search_passes
        out.model_calls = (session.forward_passes - calls0
                           + sum(o.model_calls for o in v_oracles)
                           + sum(s.forward_passes for s in benign_sessions))
        return out

    # ------------------------------------------------------------------ steps
    def _interventions(self, sites: list[str], kind: str, benign: list[ReplaySession], *,
                       baseline: Any, donor: Any, factor: float | None,
                       model: Any) -> list[Intervention]:
        from analysis.interventions import INTERVENTION_KINDS, DonorBaseline, Intervention

        if kind not in INTERVENTION_KINDS:
            raise AnalysisError(
                f"intervention={kind!r}: use one of {', '.join(INTERVENTION_KINDS)}")
        if kind in ("mean", "resample"):
            if baseline is None:
                if not benign:
                    raise AnalysisError(
                        f"intervention={kind!r} needs a baseline of benign traffic: pass "
                        "benign=[incidents] or baseline=DonorBaseline.from_incidents(...), or use "
                        "intervention='zero'")
                bases = sorted({s.split("[", 1)[0] for s in sites})
                baseline = DonorBaseline.from_incidents([s.incident for s in benign], sites=bases,
                                                   model=model)
            return [Intervention(s, kind, donor=baseline) for s in sites]  # type: ignore[arg-type]
        if kind == "patch":
            if donor is None:
                if not benign:
                    raise AnalysisError("intervention='patch' needs donor= (a benign incident "
                                        "or counterfactual prompt ids) or benign=[...]")
                donor = benign[0].incident
            return [Intervention(s, "patch", donor=donor) for s in sites]
        if kind == "scale":
            if factor is None:
                raise AnalysisError("intervention='scale' needs factor=, e.g. factor=0.0")
            return [Intervention(s, "scale", factor=factor) for s in sites]
        return [Intervention(s, "zero") for s in sites]

    def _search(self, oracle: SessionOracle, order: list[int]) -> Reduction:
        k = self.max_fix_set_size
        if self.search_strategy == "exhaustive":
            return exhaustive_search(oracle, max_size=k, max_sets=self.max_exhaustive_sets)
        if self.search_strategy == "beam":
            return beam_search(oracle, max_size=k, beam_width=self.beam_width)
        red = progressive_reduce(oracle, order, max_size=k)
        if red.items is not None or "max_fix_set_size" not in red.reason:
            return red
        # Non-monotone interplay along the ranking: delta debugging on everything (order-free).
        if not flipped(oracle.verify(order)):
            return red
        dd = ddmin(oracle, order)
        dd.trace = [*red.trace, "progressive reduction exceeded the size bound; ddmin:",
                    *dd.trace]
        if dd.items is not None and len(dd.items) > k:
            return Reduction(None, f"delta debugging's smallest set has {len(dd.items)} "
                                   f"interventions, more than max_fix_set_size={k}", dd.trace)
        return dd

    def _variant_oracles(self, session: ReplaySession, spec: Failure, bound: BoundFailure,
                         ivs: list[Intervention], variants: Sequence[Any] | None,
                         benign: list[ReplaySession], tokenizer: Any
                         ) -> tuple[list[SessionOracle], int, int]:
        """Oracles of the variants that fail when replayed clean; (oracles, tried, passes of
        the dropped ones)."""
        if variants is None:
            pool = prompt_tokens(session)
            for b in benign:
                pool += prompt_tokens(b)
            items: list[Any] = substitution_variants(session, self.n_variants, seed=self.seed,
                                                     pool=pool)
            # a variant's failing token: the incident's (text/recorded predicates re-resolve)
            vspec = spec if spec.kind in ("token", "label", "metric", "text") else \
                Failure.token(int(bound.token_id or 0), step=bound.step)
        else:
            items, vspec = list(variants), spec
            if spec.kind == "recorded":
                vspec = Failure.token(int(bound.token_id or 0))
        out: list[SessionOracle] = []
        dropped = 0
        for i, v in enumerate(items):
            vs = as_session(v, template=session, name=f"variant{i}")
            try:
                vb = vspec.bind(vs, tokenizer=tokenizer, variant=True)
            except AnalysisError:
                continue  # e.g. the text is not in this variant's output: not a failing variant
            o = SessionOracle(vs, vb, ivs, max_batch=self.max_batch)
            if failing(o.verify([])):
                out.append(o)
            else:
                dropped += o.passes
        return out, len(items), dropped

    @staticmethod
    def _greedy_check(session: ReplaySession, spec: Failure, tokenizer: Any, fs: FixSet) -> None:
        """For text failures: does a free greedy continuation with the fix still produce it?"""
        from ._failure import _decode

        tok = tokenizer if tokenizer is not None else spec.tokenizer
        r = session.verify(fs.interventions, greedy=True)
        text = _decode(tok, [int(t) for t in r.tokens()[0].tolist()])
        fs.greedy_output = text
        fs.greedy_check = spec.text is not None and spec.text not in text
        fs.notes.append(f"greedy continuation with the fix (replayed): {text!r}")

    @staticmethod
    def _variant_results(oracles: list[SessionOracle], items: list[int]) -> list[VariantResult]:
        res = []
        for o in oracles:
            clean, fixed = o.verify([]), o.verify(items)
            res.append(VariantResult(id=o.session.incident.id, metric_clean=clean,
                                     metric_fixed=fixed, flipped=flipped(fixed)))
        return res

    def _grow(self, oracle: SessionOracle, v_oracles: list[SessionOracle], order: list[int],
              items: list[int], roles: dict[int, str], results: list[VariantResult],
              fs: FixSet) -> tuple[list[int], list[VariantResult]]:
        """Add elements still-failing variants need until the flip rate reaches the threshold
        (``early_stop_threshold``) or the size bound; prune additions that do not help."""
        def rate(rs: list[VariantResult]) -> float:
            return sum(r.flipped for r in rs) / len(rs) if rs else 1.0

        tried: set[int] = set()
        while rate(results) < self.early_stop_threshold and len(items) < self.max_fix_set_size:
            todo = [i for i, r in enumerate(results) if not r.flipped and i not in tried]
            if not todo:
                break
            vi = todo[0]
            tried.add(vi)
            vo = v_oracles[vi]
            pool = [i for i in order if i not in set(items)]
            red = progressive_reduce(vo, pool, base=items,
                                     max_size=self.max_fix_set_size - len(items))
            fs.trace.extend(f"variant {vo.session.incident.id}: {t}" for t in red.trace)
            if red.items is None:
                fs.notes.append(f"variant {vo.session.incident.id} not fixable within the size "
                                f"bound: {red.reason}")
                continue
            for e in red.items:
                roles[e] = "variants"
            items = items + red.items
            results = self._variant_results(v_oracles, items)
        # prune growth elements whose removal keeps the flip rate
        for e in [x for x in items if roles.get(x) == "variants"]:
            rest = [x for x in items if x != e]
            rs = self._variant_results(v_oracles, rest)
            if rate(rs) >= rate(results):
                items, results = rest, rs
                roles.pop(e)
        if any(r == "variants" for r in roles.values()):
            fs.notes.append("elements with role 'variants' were added because the core set's "
                            f"flip rate was below early_stop_threshold="
                            f"{self.early_stop_threshold}; removing any of them lowers it")
        return items, results

    @staticmethod
    def _done(fs: FixSet, oracle: SessionOracle, calls0: int, *, reason: str,
              keep: bool = False) -> FixSet:
        fs.reason = reason
        if not keep:
            fs.flip = False
            fs.interventions = []
            fs.necessity = []
            fs.forward_passes = oracle.passes
            fs.model_calls = oracle.session.forward_passes - calls0
        return fs


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

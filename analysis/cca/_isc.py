"""IS-C on a replay session: the pairwise interaction of a set of interventions, measured on
the failing incident and its failing variants (the estimator and its result types are
:mod:`._interactions`).

Example::

    isc = interaction_indices(session, fix.interventions, failure=Failure.token(7),
                              variants=other_failing_prompts)
    [(p.a, p.b, p.index, p.ci, p.label) for p in isc.pairs]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from analysis.interventions import Intervention
from analysis.replay import ReplaySession

from ._failure import Failure
from ._growth import variant_oracles
from ._interactions import Interactions, pairwise_interactions
from ._oracle import SessionOracle

__all__ = ["interaction_indices"]


def interaction_indices(session: ReplaySession, interventions: Sequence[Intervention], *,
                        failure: Failure | Callable[..., Any] | None = None,
                        variants: Sequence[Any] = (), tokenizer: Any = None,
                        max_exact: int = 5, n_permutations: int = 32, n_bootstrap: int = 2000,
                        confidence: float = 0.95, threshold: float = 0.2,
                        seed: int = 0) -> Interactions:
    """IS-C of a fix set's ``interventions`` on the failing ``session`` (module doc), measured on
    the incident and on every given variant (incidents / sessions / prompt ids) that fails when
    replayed clean. ``failure``: as for :meth:`CausalCCA.search_fix_set` (default: from the
    incident).

    Example::

        fix = CausalCCA().search_fix_set(session, benign=benign, failure=Failure.token(7))
        isc = interaction_indices(session, fix.interventions, failure=Failure.token(7))
        [(p.a, p.b, p.label) for p in isc.pairs]
    """
    spec = Failure.coerce(failure, session.incident, tokenizer=tokenizer)
    bound = spec.bind(session, tokenizer=tokenizer)
    ivs = list(interventions)
    main = SessionOracle(session, bound, ivs)
    others, _, _ = variant_oracles(session, spec, bound, ivs, list(variants), [], tokenizer,
                                   n_variants=0, seed=seed, max_batch=1)
    return pairwise_interactions([main, *others], list(range(len(ivs))),
                                 sites=[iv.site for iv in ivs], max_exact=max_exact,
                                 n_permutations=n_permutations, n_bootstrap=n_bootstrap,
                                 confidence=confidence, threshold=threshold, seed=seed)

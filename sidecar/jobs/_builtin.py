"""The built-in job kinds, listed in one place (the sidecar injects them into its runner).

Example::

    [k.name for k in builtin_kinds()]
    # ['stats', 'replay', 'cf', 'baseline', 'cca', 'investigate', 'probe', 'probe_score']
    JobRunner(store, config=cfg, kinds=(*builtin_kinds(), MY_KIND))
"""

from __future__ import annotations

from ._baseline import BASELINE
from ._cca import CCA
from ._cf import CF
from ._investigate import INVESTIGATE
from ._kind import JobKind
from ._probe import PROBE, PROBE_SCORE
from ._replay import REPLAY
from ._stats import STATS

__all__ = ["builtin_kinds"]


def builtin_kinds() -> tuple[JobKind, ...]:
    """``stats``, ``replay``, ``cf``, ``baseline``, ``cca``, ``investigate``, ``probe`` and
    ``probe_score``."""
    return (STATS, REPLAY, CF, BASELINE, CCA, INVESTIGATE, PROBE, PROBE_SCORE)

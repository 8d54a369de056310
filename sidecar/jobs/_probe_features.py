"""What a failure-signature probe reads: the residual stream at the last prompt position.

One vector per (incident, site): the site's value at step 0 (the prefill: every prompt
position), last position, batch row 0 — from the incident's recorded activations when it has
them at every site asked, else by deterministic replay of its registered model (prefill only;
the fingerprint is checked, so a probe never reads another model's states). Recorded and
replayed values are the same numbers (replay is bit-exact on CPU).

Example::

    sites = probe_sites(["blocks.*.resid_post"], model=model, recorded=inc.sites())
    x, how = incident_features(inc, sites, model=model)   # {site: [d] float64}, "recorded"
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from integrations.incident import Incident

__all__ = ["DEFAULT_SITES", "NoFeaturesError", "incident_features", "probe_sites"]

#: The default sites: the residual stream after every block (the decodability curve).
DEFAULT_SITES = ("blocks.*.resid_post",)


class NoFeaturesError(Exception):
    """An incident whose features cannot be had (the message says why)."""


def probe_sites(patterns: Sequence[str], *, model: Any, recorded: Sequence[str]) -> list[str]:
    """Canonical site names for ``patterns``: resolved on ``model`` when there is one, else the
    ``recorded`` activation sites they match (``*`` matches a layer index)."""
    if model is not None:
        from integrations.sites import resolve_sites

        return [b.site for b in resolve_sites(model, list(patterns))]
    out = [s for s in sorted(recorded, key=_layer_order)
           if any(fnmatch.fnmatchcase(s, p) for p in patterns)]
    return list(dict.fromkeys(out))


def _layer_order(site: str) -> tuple[int, str]:
    parts = site.split(".")
    return (int(parts[1]), site) if len(parts) > 2 and parts[1].isdigit() else (-1, site)


def _last(t: Any) -> np.ndarray:
    """The last position of row 0 as float64 (``[batch, pos, d]`` or ``[pos, d]``)."""
    v = t[0, -1] if t.dim() == 3 else t[-1]
    return np.asarray(v.detach().float().cpu().numpy(), dtype=np.float64)


def _recorded(inc: Incident, sites: Sequence[str]) -> dict[str, np.ndarray] | None:
    have = set(inc.sites("activation"))
    if not all(s in have and 0 in inc.steps(s, kind="activation") for s in sites):
        return None
    return {s: _last(inc.tensor(s, step=0, kind="activation")) for s in sites}


def incident_features(inc: Incident, sites: Sequence[str], *, model: Any,
                      ) -> tuple[dict[str, np.ndarray], str]:
    """``({site: vector}, "recorded" | "replayed")`` (module doc); :class:`NoFeaturesError`
    when the incident lacks the activations and there is no model to replay it with."""
    found = _recorded(inc, sites)
    if found is not None:
        return found, "recorded"
    if model is None:
        raise NoFeaturesError(f"no recorded activations at {list(sites)[:3]}… at step 0 and its "
                              "model is not registered (models:) to replay it")
    from analysis.replay import Replayer
    from integrations.errors import ForensicsError

    try:
        run = Replayer(model).load(inc, measure=False).run_edited(capture=list(sites),
                                                                  last_step=0)
    except ForensicsError as e:
        raise NoFeaturesError(f"replay failed: {e}") from e
    return {s: _last(run.activations[s][0]) for s in sites}, "replayed"

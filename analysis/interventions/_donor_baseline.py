"""The donor of ``mean`` and ``resample`` interventions: per-site means and pools of benign traffic.

(Not to be confused with :class:`analysis.cf.CFBaseline`, the detectors' reference distributions.)

A site's value is treated as a bag of **position-agnostic site vectors**: a ``[batch, pos, *vec]``
activation contributes ``batch * pos`` vectors of shape ``vec`` (``[d_model]``, ``[n_heads,
d_head]`` for ``attn.z``, ``[d_mlp]`` for ``mlp.post``); a ``[batch, *vec]`` one (a pooled
classifier's ``unembed``) ``batch`` vectors. Every step of every incident contributes. The
``mean`` of a site is the average of all its vectors (accumulated in float64); the resample
``pool`` keeps up to ``max_pool`` of them (a seeded uniform subsample when there are more).
Sites are keyed by their base (selectors dropped: a recorded tensor is always the full one).

Sites not recorded in a baseline incident are computed by replaying it (``model=`` required).

Example::

    baseline = DonorBaseline.from_incidents(benign, sites=["blocks.*.mlp"], model=model)
    baseline.mean("blocks.1.mlp").shape        # torch.Size([d_model])
    Intervention("blocks.1.mlp", "mean", donor=baseline)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from analysis.replay import Replayer
from integrations.errors import InterventionError
from integrations.sites import resolve_sites

if TYPE_CHECKING:
    from integrations.incident import Incident

__all__ = ["DonorBaseline", "site_base", "site_vectors"]


def site_base(site: str) -> str:
    """The site without selectors: ``blocks.0.attn.z[head=3]`` -> ``blocks.0.attn.z``."""
    return site.split("[", 1)[0]


def site_vectors(t: torch.Tensor) -> torch.Tensor:
    """``[batch, pos, *vec]`` -> ``[batch*pos, *vec]``; ``[batch, *vec]`` stays (see module doc)."""
    if t.dim() >= 3:
        return t.reshape(-1, *t.shape[2:])
    if t.dim() == 2:
        return t
    raise InterventionError(f"a site tensor needs a batch dimension, got shape {tuple(t.shape)}")


class DonorBaseline:
    """Per-site means and resample pools of benign traffic (see the module doc).

    Build with :meth:`from_incidents` (or :meth:`from_vectors`).
    """

    def __init__(self, *, means: Mapping[str, torch.Tensor], pools: Mapping[str, torch.Tensor],
                 counts: Mapping[str, int], incident_ids: Sequence[str]) -> None:
        self._means = dict(means)
        self._pools = dict(pools)
        self._counts = dict(counts)
        self.incident_ids = list(incident_ids)

    @classmethod
    def from_vectors(cls, vectors: Mapping[str, torch.Tensor], *,
                     max_pool: int = 4096, seed: int = 0) -> DonorBaseline:
        """From ``{site: [n, *vec]}`` site vectors directly."""
        return cls._build({site_base(k): [v] for k, v in vectors.items()}, [], max_pool, seed)

    @classmethod
    def from_incidents(cls, incidents: Iterable[Incident], *, sites: Sequence[str] | None = None,
                       model: torch.nn.Module | None = None, max_pool: int = 4096,
                       seed: int = 0, allow_fingerprint_mismatch: bool = False) -> DonorBaseline:
        """Means and pools of ``sites`` over benign ``incidents``.

        ``sites=None``: every site recorded in all of them. Sites may use wildcards when
        ``model`` is given (resolved on it). A site an incident did not record is computed by
        replaying that incident on ``model`` (fingerprint-checked); without a model that is an
        :class:`~integrations.errors.InterventionError`.
        """
        incs = list(incidents)
        if not incs:
            raise InterventionError("a baseline needs at least one benign incident")
        if sites is None:
            common = set.intersection(*({site_base(s) for s in i.sites()} for i in incs))
            bases = sorted(common)
            if not bases:
                raise InterventionError(
                    "the baseline incidents share no recorded site; pass sites= and model=")
        elif model is not None:
            bases = list(dict.fromkeys(b.base for b in resolve_sites(model, list(sites))))
        else:
            bases = list(dict.fromkeys(site_base(s) for s in sites))
        chunks: dict[str, list[torch.Tensor]] = {b: [] for b in bases}
        for inc in incs:
            recorded = {site_base(s): s for s in inc.sites()}
            missing = [b for b in bases if b not in recorded]
            replayed: dict[str, list[torch.Tensor]] = {}
            if missing:
                if model is None:
                    raise InterventionError(
                        f"baseline incident {inc.id!r} did not record {missing[:5]}; pass "
                        "model= to compute them by replay")
                sess = Replayer(model, allow_fingerprint_mismatch=allow_fingerprint_mismatch) \
                    .load(inc, measure=False)
                res = sess.run(capture=missing)
                replayed = {site_base(k): v for k, v in res.activations.items()}
            for b in bases:
                if b in recorded:
                    s = recorded[b]
                    ts = [inc.tensor(s, step=st, kind="activation")
                          for st in inc.steps(s, kind="activation")]
                else:
                    ts = replayed[b]
                chunks[b].extend(site_vectors(t) for t in ts)
        return cls._build(chunks, [i.id for i in incs], max_pool, seed)

    @classmethod
    def _build(cls, chunks: Mapping[str, list[torch.Tensor]], ids: Sequence[str],
               max_pool: int, seed: int) -> DonorBaseline:
        means: dict[str, torch.Tensor] = {}
        pools: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        g = torch.Generator().manual_seed(seed)
        for b, parts in chunks.items():
            shapes = {tuple(p.shape[1:]) for p in parts}
            if len(shapes) != 1:
                raise InterventionError(f"baseline vectors of {b!r} disagree in shape: {shapes}")
            allv = torch.cat([p.detach().cpu() for p in parts])  # [n, *vec]
            if allv.shape[0] == 0:
                raise InterventionError(f"baseline has no vectors for {b!r}")
            means[b] = allv.double().mean(0).to(allv.dtype)
            counts[b] = int(allv.shape[0])
            if allv.shape[0] > max_pool:
                allv = allv[torch.randperm(allv.shape[0], generator=g)[:max_pool]]
            pools[b] = allv.clone()
        return cls(means=means, pools=pools, counts=counts, incident_ids=ids)

    def sites(self) -> list[str]:
        """The (base) sites this baseline covers."""
        return sorted(self._means)

    def _key(self, site: str) -> str:
        b = site_base(site)
        if b not in self._means:
            raise InterventionError(
                f"the baseline has no vectors for site {b!r}; it covers {self.sites()[:8]}"
                f"{' ...' if len(self._means) > 8 else ''}: rebuild it with sites= including it")
        return b

    def mean(self, site: str) -> torch.Tensor:
        """The mean site vector ``[*vec]`` of ``site`` (selectors ignored)."""
        return self._means[self._key(site)]

    def pool(self, site: str) -> torch.Tensor:
        """The resample pool ``[n, *vec]`` of ``site``."""
        return self._pools[self._key(site)]

    def count(self, site: str) -> int:
        """How many vectors the mean of ``site`` averages."""
        return self._counts[self._key(site)]

    def sample(self, site: str, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` vectors drawn uniformly with replacement from the pool, ``[n, *vec]``."""
        pool = self.pool(site)
        idx = torch.randint(0, pool.shape[0], (n,), generator=generator)
        return pool[idx]

    def describe(self) -> str:
        return f"{len(self.incident_ids)} incidents, {len(self._means)} sites"

    def __repr__(self) -> str:
        return f"DonorBaseline({self.describe()})"

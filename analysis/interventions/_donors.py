"""Donor values for ``patch``/``mean``/``resample`` interventions of a replay session.

Donor *runs* (another incident's replay, a counterfactual prompt) are forward passes of the same
model, so they are computed **before** the intervened replay starts (never from inside its hooks)
and cached per (donor, site). The intervened replay then only looks values up and aligns them:

* prefill step: donor positions aligned from the end; missing leading positions are reported
  through a coverage mask (selecting them is an error, see ``InterventionPlan``);
* decode steps: one position each, matched 1:1 by step;
* batch: a donor with one row is broadcast to the incident's rows.

The cache lives on the session (:meth:`~analysis.replay.ReplaySession.layer_state`), so donor
runs are shared by every evaluation of that session.

Example::

    donors = DonorCache.of(session)
    donors.prepare(sets)                          # runs the donor forwards (counted)
    values, coverage = donors(iv, bound, step, (rows, pos, d))
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from analysis.replay import Replayer, ReplaySession
from integrations.errors import InterventionError, ReplayError
from integrations.incident import Incident
from integrations.sites import BoundSite

if TYPE_CHECKING:
    from ._intervention import Intervention

__all__ = ["DonorCache", "resample_generator"]


def resample_generator(seed: int, site: str, step: int) -> torch.Generator:
    """The generator of a ``resample`` draw: depends only on (seed, site, step), so batched and
    sequential evaluations draw the same values; the global RNG is never touched."""
    mixed = (int(seed) * 1_000_003 + zlib.crc32(f"{site}|{step}".encode())) % (2**63)
    return torch.Generator().manual_seed(mixed)


def _donor_key(iv: Intervention) -> tuple[str, Any] | None:
    if isinstance(iv.donor, Incident):
        return ("incident", id(iv.donor))
    ids = iv.prompt_donor
    if ids is not None:
        return ("prompt", tuple(int(x) for x in ids.reshape(-1).tolist()))
    return None


class DonorCache:
    """Resolves donor values for one session (see the module doc)."""

    def __init__(self, session: ReplaySession) -> None:
        self._s = session
        self._acts: dict[tuple[tuple[str, Any], str], dict[int, torch.Tensor]] = {}
        self._keep: dict[tuple[str, Any], Any] = {}  # keep donor objects alive (id() keys)

    @classmethod
    def of(cls, session: ReplaySession) -> DonorCache:
        """The session's donor cache (made on first use)."""
        return session.layer_state(cls)

    # ------------------------------------------------------------------ donor runs
    def prepare(self, sets: Sequence[Sequence[Intervention]]) -> None:
        """Run (once) every donor forward the sets need: other incidents, prompts."""
        need: dict[tuple[str, Any], tuple[Intervention, set[str]]] = {}
        for ivs in sets:
            for iv in ivs:
                key = _donor_key(iv)
                if key is None:
                    continue
                bases = {b.base for b in self._s.resolve(iv.site)}
                missing = {b for b in bases if (key, b) not in self._acts}
                if missing:
                    entry = need.setdefault(key, (iv, set()))
                    entry[1].update(missing)
        for key, (iv, bases) in need.items():
            self._keep[key] = iv.donor
            if isinstance(iv.donor, Incident):
                got = self._from_incident(iv.donor, sorted(bases))
            else:
                assert iv.prompt_donor is not None
                got = self._from_prompt(iv.prompt_donor, sorted(bases))
            for base, by_step in got.items():
                self._acts[(key, base)] = by_step

    def _from_incident(self, donor: Incident, bases: list[str]) -> dict[str, dict[int, torch.Tensor]]:
        out: dict[str, dict[int, torch.Tensor]] = {}
        recorded = {s.split("[", 1)[0]: s for s in donor.sites()}
        missing = [b for b in bases if b not in recorded]
        for b in bases:
            if b in recorded:
                s = recorded[b]
                out[b] = {st: donor.tensor(s, step=st, kind="activation")
                          for st in donor.steps(s, kind="activation")}
        if missing:
            sess = Replayer(self._s.model,
                            allow_fingerprint_mismatch=self._s.replayer.allow_fingerprint_mismatch
                            ).load(donor)
            res = sess.run(capture=missing)
            self._s.count_forward_passes(sess.forward_passes)
            for b in missing:
                out[b] = dict(enumerate(res.activations[b]))
        return out

    def _from_prompt(self, ids: torch.Tensor, bases: list[str]) -> dict[str, dict[int, torch.Tensor]]:
        """Run the counterfactual prompt, teacher-forced on the incident's decode tokens."""
        try:
            plan = self._s.plan.with_prompt(ids)
        except ReplayError as e:
            raise InterventionError(f"a prompt donor cannot be run: {e}") from e
        raw = self._s.run_edited(plan=plan, capture=bases)
        return {k: dict(enumerate(v)) for k, v in raw.activations.items()}

    # ------------------------------------------------------------------ lookups
    def __call__(self, iv: Intervention, b: BoundSite, step: int,
                 shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Donor values of full shape ``shape`` (``[rows, ...]``) and the position coverage."""
        if iv.kind == "patch" and iv.value is not None:
            v = iv.value
            if isinstance(v, Mapping):
                if step not in v:
                    raise InterventionError(
                        f"{iv.label}: value= has no tensor for step {step} (steps given: "
                        f"{sorted(v)}); give every step or restrict with steps=")
                v = v[step]
            return _broadcast(iv, torch.as_tensor(v), shape), None
        if iv.kind == "mean":
            assert iv.baseline is not None
            return _broadcast(iv, _vector(iv, iv.baseline.mean(b.base), shape), shape), None
        if iv.kind == "resample":
            assert iv.baseline is not None
            lead = shape[:2] if len(shape) >= 3 else shape[:1]
            n = 1
            for d in lead:
                n *= d
            g = resample_generator(iv.seed, b.site, step)
            draw = iv.baseline.sample(b.base, n, g)  # [n, *vec]
            _vector(iv, draw[0], shape)
            return draw.reshape(shape), None
        key = _donor_key(iv)
        assert key is not None
        by_step = self._acts.get((key, b.base))
        if by_step is None:  # pragma: no cover - prepare() always runs first
            raise InterventionError(f"{iv.label}: donor values were not prepared")
        if step not in by_step:
            raise InterventionError(
                f"{iv.label}: the donor has no value of {b.base!r} at step {step} (it has steps "
                f"{sorted(by_step)}); restrict the intervention with steps=")
        return _align(iv, by_step[step], shape)


def _vector(iv: Intervention, vec: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    want = shape[2:] if len(shape) >= 3 else shape[1:]
    if tuple(vec.shape) != tuple(want):
        raise InterventionError(
            f"{iv.label}: baseline vectors have shape {tuple(vec.shape)}, the site's vectors "
            f"{tuple(want)}: the baseline was built for another model or site")
    return vec


def _broadcast(iv: Intervention, v: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        return torch.broadcast_to(v, shape)
    except RuntimeError as e:
        raise InterventionError(
            f"{iv.label}: a value of shape {tuple(v.shape)} does not broadcast to the site's "
            f"full tensor {tuple(shape)} at this step; give a full tensor, a per-position "
            "vector, or a {step: tensor} mapping") from e


def _align(iv: Intervention, donor: torch.Tensor,
           shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if donor.dim() != len(shape) or tuple(donor.shape[2:]) != tuple(shape[2:]) or \
            (donor.dim() == 2 and donor.shape[1] != shape[1]):
        raise InterventionError(
            f"{iv.label}: donor value has shape {tuple(donor.shape)}, the site {tuple(shape)}: "
            "the donor comes from another model or site")
    if donor.shape[0] not in (1, shape[0]):
        raise InterventionError(
            f"{iv.label}: the donor has {donor.shape[0]} batch rows, the incident {shape[0]}; "
            "use a donor with one row or as many as the incident")
    cov: torch.Tensor | None = None
    if donor.dim() >= 3:
        ld, li = int(donor.shape[1]), int(shape[1])
        if ld >= li:
            donor = donor[:, ld - li:]
        else:
            pad = torch.zeros((donor.shape[0], li - ld, *donor.shape[2:]), dtype=donor.dtype)
            donor = torch.cat([pad, donor], dim=1)
            cov = torch.zeros(li, dtype=torch.bool)
            cov[li - ld:] = True
    return torch.broadcast_to(donor, shape), cov


"""Directions in a site's vector space: what ``project`` and ``steer`` interventions act on.

A :class:`Subspace` is an orthonormal basis ``[k, d]`` of directions in a site's last dimension
(``d_model`` for the residual stream, ``d_head`` for one head of ``attn.z``) and a rule for the
coordinates along it. ``project`` replaces each selected vector ``h`` by
``h - Q^T (Q h - c(Q h))``: the component in the subspace is removed (``to="zero"``, directional
ablation), set to a fixed benign coordinate (``to="mean"``), or clamped into a benign range
(``to="clamp"``: coordinates inside ``[lo, hi]`` are left exactly as they are, so traffic that
stays inside the range the subspace was calibrated on is not changed at all). ``steer`` adds
``factor * vector`` (ActAdd / CAA-style activation addition).

A :class:`LinearGate` makes either conditional: the intervention applies only to the vectors
on which a linear probe of the same site value fires (``w . h + b > 0``), e.g. a probe trained
to recognise the failure.

Example::

    sub = Subspace.from_directions(diff[None, :], to="clamp", lo=lo, hi=hi)
    Intervention("blocks.12.resid_post", "project", direction=sub)
    Intervention("blocks.12.resid_post", "steer", direction=-diff, factor=4.0,
                 gate=LinearGate(weight=w, bias=b))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from integrations.errors import InterventionError

__all__ = ["LinearGate", "Subspace", "SubspaceRule", "check_vector"]

SubspaceRule = Literal["zero", "mean", "clamp"]


def check_vector(t: torch.Tensor, *, what: str, dim: int | None = None) -> torch.Tensor:
    """A finite float32 CPU copy of ``t`` of shape ``[dim]`` (any length when ``dim`` is None)."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or (dim is not None and t.numel() != dim):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InterventionError(f"{what} must be a 1-D tensor"
                                f"{'' if dim is None else f' of length {dim}'}, got {shape}")
    out = t.detach().to("cpu", torch.float32).clone()
    if not bool(torch.isfinite(out).all()):
        raise InterventionError(f"{what} has non-finite entries")
    return out


@dataclass(frozen=True, eq=False)
class Subspace:
    """An orthonormal basis ``[k, d]`` and the rule for its coordinates (module doc).

    Build with :meth:`from_directions` (orthonormalises any ``[k, d]`` directions).
    """

    basis: torch.Tensor   # [k, d], orthonormal rows
    to: SubspaceRule = "zero"
    mean: torch.Tensor | None = None   # [k]: the coordinates ``to="mean"`` sets
    lo: torch.Tensor | None = None     # [k]: ``to="clamp"`` lower bounds (None = unbounded)
    hi: torch.Tensor | None = None     # [k]: ``to="clamp"`` upper bounds (None = unbounded)

    def __post_init__(self) -> None:
        b = self.basis
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[0] == 0:
            raise InterventionError("Subspace.basis must be a [k, d] tensor with k >= 1")
        gram = b.float() @ b.float().T
        if not torch.allclose(gram, torch.eye(b.shape[0]), atol=1e-4):
            raise InterventionError("Subspace.basis rows must be orthonormal; build it with "
                                    "Subspace.from_directions(directions)")
        k = b.shape[0]
        if self.to not in ("zero", "mean", "clamp"):
            raise InterventionError(f"Subspace.to must be 'zero', 'mean' or 'clamp', "
                                    f"got {self.to!r}")
        if self.to == "mean" and self.mean is None:
            raise InterventionError("Subspace(to='mean') needs mean= (the [k] coordinates)")
        if self.to == "clamp" and self.lo is None and self.hi is None:
            raise InterventionError("Subspace(to='clamp') needs lo= and/or hi= ([k] bounds)")
        for name in ("mean", "lo", "hi"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, check_vector(v, what=f"Subspace.{name}", dim=k))
        object.__setattr__(self, "basis", b.detach().to("cpu", torch.float32).clone())

    @classmethod
    def from_directions(cls, directions: torch.Tensor, *, to: SubspaceRule = "zero",
                        mean: torch.Tensor | None = None, lo: torch.Tensor | None = None,
                        hi: torch.Tensor | None = None) -> Subspace:
        """The span of ``directions`` (``[k, d]`` or ``[d]``), orthonormalised (QR). Bounds and
        means are coordinates in the *returned* basis: compute them with :meth:`coords`.

        Example::

            sub = Subspace.from_directions(d)            # remove the direction d
        """
        d = directions.detach().to("cpu", torch.float32)
        if d.dim() == 1:
            d = d[None, :]
        if d.dim() != 2 or not bool(torch.isfinite(d).all()) or float(d.norm()) == 0.0:
            raise InterventionError("directions must be a finite, non-zero [k, d] or [d] tensor")
        q, r = torch.linalg.qr(d.T)              # q: [d, k]
        sign = torch.sign(torch.diagonal(r))     # keep each direction's orientation
        sign[sign == 0] = 1
        return cls(basis=(q * sign).T.contiguous(), to=to, mean=mean, lo=lo, hi=hi)

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    def coords(self, h: torch.Tensor) -> torch.Tensor:
        """Coordinates ``[..., k]`` of vectors ``h`` ``[..., d]`` in the basis."""
        return h.float() @ self.basis.to(h.device).T

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``[..., d]`` with its subspace coordinates replaced by the rule (module doc)."""
        q = self.basis.to(h.device)
        c = h.float() @ q.T                      # [..., k]
        if self.to == "zero":
            delta = c
        elif self.to == "mean":
            assert self.mean is not None
            delta = c - self.mean.to(h.device)
        else:
            target = c
            if self.lo is not None:
                target = torch.maximum(target, self.lo.to(h.device))
            if self.hi is not None:
                target = torch.minimum(target, self.hi.to(h.device))
            delta = c - target
            if not bool((delta != 0).any()):
                return h                          # inside the range everywhere: untouched
        return (h.float() - delta @ q).to(h.dtype)

    def describe(self) -> str:
        return f"subspace(k={self.k}, d={self.dim}, to={self.to})"


@dataclass(frozen=True, eq=False)
class LinearGate:
    """Apply an intervention only where ``weight . h + bias > 0`` (a linear probe of the value).

    Example::

        LinearGate(weight=probe_w, bias=probe_b)       # e.g. from analysis.rca probes
    """

    weight: torch.Tensor   # [d]
    bias: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", check_vector(self.weight, what="LinearGate.weight"))
        object.__setattr__(self, "bias", float(self.bias))

    def fires(self, h: torch.Tensor) -> torch.Tensor:
        """Boolean ``[...]`` over vectors ``h`` ``[..., d]``."""
        if h.shape[-1] != self.weight.numel():
            raise InterventionError(f"gate weight has length {self.weight.numel()}, the site "
                                    f"vectors have {h.shape[-1]}")
        return (h.float() @ self.weight.to(h.device) + self.bias) > 0

"""Fix constructions for ``sentiment_fix_explore.py``: candidates, activations, fitting.

Each :class:`Candidate` is fitted on derivation activations (:func:`collect`, batch 1, at
``embed`` and every ``blocks.i.resid_post``) into a list of portable
:class:`analysis.interventions.Intervention` acting on *every* position of one site:

* ``dom`` — the generic difference of means (DESIGN §14 step 4): ``d`` = mean over failing
  minus mean over twins (or controls) of the vectors at one position kind (``cls``, the token
  mean ``all``, or the ``span`` = suffix tokens), applied as ``project`` (remove ``d``: to zero,
  or to the benign mean coordinate) or ``steer`` (add ``-d``).
* ``gated`` — span neutralisation: a :class:`~analysis.interventions.LinearGate` (L2 logistic
  regression, C = 1, class-balanced) trained on the site's token vectors to tell the *span*
  tokens (the suffix of failing cases, optionally also of controls) from every other token
  (review words, [CLS], [SEP], twins, clean reviews); where it fires, ``project`` sets the
  vector's coordinates in a subspace (``k`` top principal directions of the span tokens, or the
  whole space ``k = d``) to those of the mean non-span token.

Example::

    (iv,) = fit(Candidate("gated", "blocks.0.resid_post", "span", "failing", "d"), acts, masks)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from analysis.interventions import Intervention, LinearGate, Subspace
from analysis.scenarios._base import Prompt

SITES = ["embed", *(f"blocks.{i}.resid_post" for i in range(6))]
GROUPS = ("failing", "controls", "twins", "clean")
Acts = dict[str, dict[str, list[torch.Tensor]]]  # group -> site -> [pos, d] per prompt


@dataclass(frozen=True)
class Candidate:
    """One fix construction; :func:`fit` turns it into interventions from derivation data."""

    family: str          # dom | gated
    site: str
    kind: str = "span"   # dom: cls | all | span
    contrast: str = ""   # dom: twins | controls ; gated: failing | failing+controls (gate spans)
    rule: str = ""       # dom: zero | mean | steer ; gated: k (subspace rank, "d" = full)

    @property
    def label(self) -> str:
        return f"{self.family}:{self.site}:{self.kind}:{self.contrast}:{self.rule}"


def candidates() -> list[Candidate]:
    out = [Candidate("gated", s, "span", g, k) for s in SITES
           for g in ("failing+controls", "failing") for k in ("8", "32", "d")]
    out += [Candidate("dom", s, kind, c, r) for s in SITES for kind in ("cls", "all", "span")
            for c in ("twins", "controls") for r in ("zero", "mean", "steer")
            if not (kind == "cls" and s == "embed")]
    return out


# --------------------------------------------------------------------------- activations


def collect(model: Any, prompts: Sequence[Prompt]) -> dict[str, list[torch.Tensor]]:
    """``[pos, d]`` per prompt at every site in :data:`SITES`, each prompt run at batch 1."""
    from integrations.sites import attach, resolve_sites

    out: dict[str, list[torch.Tensor]] = {s: [] for s in SITES}

    def observe(b: Any, v: torch.Tensor) -> None:
        out[b.site].append(v[0].detach().clone())  # [pos, d]

    with attach(model, resolve_sites(model, SITES), observe), torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p.input_ids])  # [1, pos]
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return out


def span_mask(tok: Any, p: Prompt) -> torch.Tensor:
    """Boolean ``[pos]``: the suffix tokens of a suffixed prompt (none for an unsuffixed one)."""
    mask = torch.zeros(len(p.input_ids), dtype=torch.bool)
    if "suffix" in p.meta:
        n = len(tok(p.meta["suffix"], add_special_tokens=False)["input_ids"])
        mask[len(p.input_ids) - 1 - n:len(p.input_ids) - 1] = True
    return mask


def _vectors(acts: Acts, masks: dict[str, list[torch.Tensor]], group: str, site: str,
             kind: str) -> torch.Tensor:
    """``[n, d]``: one vector per prompt of ``group`` at ``site`` for a position kind."""
    rows = []
    for x, m in zip(acts[group][site], masks[group]):
        if kind == "cls":
            rows.append(x[0])
        elif kind == "span" and bool(m.any()):
            rows.append(x[m].mean(0))
        else:
            rows.append(x.mean(0))
    return torch.stack(rows)


def _tokens(acts: Acts, masks: dict[str, list[torch.Tensor]], groups: Sequence[str],
            site: str, span: bool) -> torch.Tensor:
    """``[n_tokens, d]``: the span tokens (``span``) or all other tokens of ``groups``."""
    return torch.cat([x[m if span else ~m] for g in groups
                      for x, m in zip(acts[g][site], masks[g])])


# --------------------------------------------------------------------------- fitting


def _fit_gate(span: torch.Tensor, other: torch.Tensor) -> LinearGate:
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([span, other]).numpy()
    y = [1] * len(span) + [0] * len(other)
    clf = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced").fit(x, y)
    return LinearGate(weight=torch.tensor(clf.coef_[0], dtype=torch.float32),
                      bias=float(clf.intercept_[0]))


def fit(c: Candidate, acts: Acts, masks: dict[str, list[torch.Tensor]]) -> list[Intervention]:
    """The interventions of ``c`` fitted on ``acts`` (one fold, or the whole derivation split)."""
    if c.family == "gated":
        span = _tokens(acts, masks, c.contrast.split("+"), c.site, True)
        other = _tokens(acts, masks, GROUPS, c.site, False)
        gate = _fit_gate(span, other)
        if c.rule == "d":
            basis = torch.eye(span.shape[1])
        else:
            basis = torch.linalg.svd(span - span.mean(0), full_matrices=False)[2][:int(c.rule)]
        sub = Subspace.from_directions(basis)
        sub = Subspace(basis=sub.basis, to="mean", mean=sub.coords(other.mean(0)))
        return [Intervention(c.site, "project", direction=sub, gate=gate)]
    fail = _vectors(acts, masks, "failing", c.site, c.kind)
    ref = _vectors(acts, masks, c.contrast, c.site, c.kind)
    d = fail.mean(0) - ref.mean(0)  # [d]
    if c.rule == "steer":
        return [Intervention(c.site, "steer", direction=-d, factor=1.0)]
    if c.rule == "zero":
        return [Intervention(c.site, "project", direction=Subspace.from_directions(d))]
    benign = torch.cat([_vectors(acts, masks, g, c.site, c.kind) for g in ("twins", "clean")])
    sub = Subspace.from_directions(d)
    return [Intervention(c.site, "project", direction=Subspace.from_directions(
        d, to="mean", mean=sub.coords(benign).mean(0)))]

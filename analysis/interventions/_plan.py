"""Apply B intervention sets at once in a batched replay (row block ``r`` gets set ``r``).

Every intervention is an affine map on the selected entries of a site's full tensor: ``zero``
and the donor kinds *set* entries, ``scale`` multiplies them. For each (site, step, shape) the
plan composes all sets into three tensors once — a set-mask ``M``, set values ``A`` and factors
``S`` over the whole batch — so the hook is one vectorised expression for all B candidates::

    new = torch.where(M, A, value * S)       # untouched entries: value * 1 == value, bit-exact

Only the row blocks of the sets that touch a site are computed on (``index_select`` /
``index_copy``); the other rows pass through untouched.

Later interventions in a set compose on earlier ones (set then scale = scaled donor value).
The vector kinds (``project``, ``steer``) are not entry-wise: they run after that expression on
the selected vectors of their rows, in set order.
Position selectors are absolute positions (see :mod:`analysis.interventions._intervention`);
they are translated to the positions of each forward call using the number of cached positions.

:meth:`InterventionPlan.apply` is a replay edit (``edit(site, value, *, step)``, see
:mod:`analysis.replay._edit`); :meth:`~analysis.interventions.Intervention.bind_sets` builds the
plan and hands it to the replay with the sites it hooks.

Example::

    sets = [[iv_a], [iv_a, iv_b]]
    donors = DonorCache.of(session)
    donors.prepare(sets)                          # donor forwards run before the replay
    plan = InterventionPlan(model, sets, rows_per_set=1, lengths=[6, 1, 1], donor_fn=donors)
    session.run_edited(plan.apply, sites=plan.bound, repeat=2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from integrations.errors import InterventionError
from integrations.sites import BoundSite, resolve_sites

from ._gate import GateTracker, PromptGate

if TYPE_CHECKING:
    from ._intervention import Intervention

#: The kinds that transform each selected vector (last dimension) after the entry-wise
#: expression instead of setting entries (see the module doc).
VECTOR_KINDS: tuple[str, ...] = ("project", "steer")

__all__ = ["VECTOR_KINDS", "DonorFn", "InterventionPlan", "localize"]

#: ``donor_fn(iv, bound, step, rows_shape) -> (values [rows, ...], coverage [pos] | None)``.
DonorFn = Callable[["Intervention", BoundSite, int, tuple[int, ...]],
                   tuple[torch.Tensor, "torch.Tensor | None"]]
#: One intervention of set ``r`` to apply at a site and step: (r, iv, bound site, its index
#: after the bound site's batch entry, with the position localised to the call).
_Todo = tuple[int, "Intervention", BoundSite, list[Any]]

#: A vector-kind intervention and its selection in the touched rows' tensor.
_VectorOp = tuple["Intervention", tuple[Any, ...]]
#: (rows: None = all | slice = one contiguous block | index tensor, M, A, S, has_set, has_scale,
#: vector ops)
_Ops = tuple["slice | torch.Tensor | None", torch.Tensor, torch.Tensor, torch.Tensor, bool, bool,
             list[_VectorOp]]


def localize(entry: Any, offset: int, length: int) -> Any:
    """Translate an absolute position index ``entry`` to a call of ``length`` positions starting
    at absolute position ``offset``; ``None`` when it selects no position of this call."""
    total = offset + length
    if isinstance(entry, slice):
        if entry == slice(None):
            return entry
        kept = [a - offset for a in range(total)[entry] if a >= offset]
        if not kept:
            return None
        if kept == list(range(kept[0], kept[-1] + 1)):
            return slice(kept[0], kept[-1] + 1)
        return tuple(kept)
    if isinstance(entry, int):
        a = entry if entry >= 0 else total + entry
        return a - offset if offset <= a < total else None
    if isinstance(entry, tuple):
        nested = bool(entry) and isinstance(entry[0], tuple)
        flat = [e[0] for e in entry] if nested else list(entry)
        kept = [x for x in (localize(int(p), offset, length) for p in flat) if x is not None]
        if not kept:
            return None
        return tuple((k,) for k in kept) if nested else tuple(kept)
    return entry  # Ellipsis or anything else: not a position index


def _full_rows(rows: slice | torch.Tensor | None, block: slice) -> slice | torch.Tensor:
    """The batch rows of the whole site tensor that row block ``block`` of the touched rows
    (``rows``: None = all, a contiguous slice, or an index tensor) stands for."""
    if rows is None:
        return block
    if isinstance(rows, slice):
        start = rows.start or 0
        return slice(start + (block.start or 0), start + (block.stop or 0))
    return rows[block]


class InterventionPlan:
    """B intervention sets resolved on a model, applied jointly by :meth:`apply` (module doc).

    ``inplace=True`` (batched evaluation only) writes the touched rows into the site's tensor in
    place instead of copying the whole batch per hooked site. It is used only without autograd
    and on canonical sites, whose tensors are fresh intermediate values consumed after the hook
    (never on ``torch:`` sites, which may return parameters or buffers); verified batch-1 runs
    always use out-of-place replacements.
    """

    def __init__(self, model: torch.nn.Module, sets: Sequence[Sequence[Intervention]], *,
                 rows_per_set: int, lengths: Sequence[int], donor_fn: DonorFn,
                 resolve: Callable[[str], list[BoundSite]] | None = None,
                 inplace: bool = False) -> None:
        self.n_sets = len(sets)
        self.rows_per_set = rows_per_set
        self.inplace = inplace
        self._lengths = list(lengths)  # positions fed by each step's call
        self._offsets = [sum(self._lengths[:k]) for k in range(len(self._lengths))]
        self._n_steps = len(self._lengths)
        self._donor_fn = donor_fn
        resolved: dict[str, list[BoundSite]] = {}
        self._entries: dict[str, list[tuple[int, Intervention, BoundSite]]] = {}
        bound: dict[str, BoundSite] = {}
        for r, ivs in enumerate(sets):
            for iv in ivs:
                if iv.site not in resolved:
                    resolved[iv.site] = resolve(iv.site) if resolve is not None else \
                        resolve_sites(model, [iv.site])
                for b in resolved[iv.site]:
                    self._entries.setdefault(b.site, []).append((r, iv, b))
                    bound.setdefault(b.site, b)
        self.gates = GateTracker(iv.gate for ivs in sets for iv in ivs
                                 if isinstance(iv.gate, PromptGate))
        for site in self.gates.sites:   # observed (and acted on where an intervention is)
            for b in (resolve(site) if resolve is not None else resolve_sites(model, [site])):
                bound.setdefault(b.site, b)
        self.bound: list[BoundSite] = list(bound.values())
        self._ops: dict[tuple[str, int, tuple[int, ...]], _Ops | None] = {}

    def _steps_of(self, iv: Intervention) -> set[int] | None:
        if iv.steps is None:
            return None
        return {s if s >= 0 else self._n_steps + s for s in iv.steps}

    def apply(self, b: BoundSite, value: torch.Tensor, *, step: int) -> torch.Tensor | None:
        """The replacement for ``value`` (site ``b`` at ``step``), or None if untouched: the
        plan as a replay edit."""
        self.gates.observe(b.site, value, prefill=step == 0)
        key = (b.site, step, tuple(value.shape))
        if key not in self._ops:
            self._ops[key] = self._build(b.site, step, value)
        ops = self._ops[key]
        if ops is None:
            return None
        rows, m, a, s, has_set, has_scale, vector_ops = ops
        if rows is None:
            sub = value
        elif isinstance(rows, slice):
            sub = value[rows]
        else:
            sub = value.index_select(0, rows)
        out = sub * s if has_scale else sub
        if has_set:
            out = torch.where(m, a, out)
        if vector_ops:
            out = out.clone() if out is value or out is sub else out
            for iv, sel in vector_ops:
                if isinstance(iv.gate, PromptGate):
                    out[sel] = self.gates.apply(iv.gate, out[sel], _full_rows(rows, sel[0]),
                                                prefill=step == 0, transform=iv.transform)
                else:
                    out[sel] = iv.transform(out[sel])
        if rows is None:
            return out
        inplace = self.inplace and b.kind != "torch" and not torch.is_grad_enabled() and \
            not value.requires_grad
        if isinstance(rows, slice):
            new = value if inplace else value.clone()
            new[rows] = out
            return new
        if inplace:
            value.index_copy_(0, rows, out)  # see the class doc: only the touched rows move
            return value
        return value.index_copy(0, rows, out)

    def _build(self, site: str, step: int, value: torch.Tensor) -> _Ops | None:
        """The (rows, M, A, S, has_set, has_scale) of ``site`` at ``step`` (module doc)."""
        rows = self.rows_per_set
        if value.shape[0] != rows * self.n_sets:
            raise InterventionError(
                f"site {site!r} has batch {value.shape[0]} at step {step}, expected "
                f"{self.n_sets} sets x {rows} rows")
        todo = self._todo(site, step, value)
        if not todo:
            return None
        # Only the row blocks of the sets that touch this site are computed on.
        touched = sorted({r for r, *_ in todo})
        block = {r: i for i, r in enumerate(touched)}
        vector_ops: list[_VectorOp] = [
            (iv, (slice(block[r] * rows, (block[r] + 1) * rows), *rest))
            for r, iv, _, rest in todo if iv.kind in VECTOR_KINDS]
        entrywise = [t for t in todo if t[1].kind not in VECTOR_KINDS]
        return (self._row_index(touched, value.device),
                *self._compose(entrywise, touched, step, value), vector_ops)

    def _todo(self, site: str, step: int, value: torch.Tensor) -> list[_Todo]:
        """The interventions on ``site`` that act at ``step``, positions localised to the call."""
        has_pos = value.dim() >= 3
        length = value.shape[1] if has_pos else 1
        # Absolute position of this tensor's first position: cached positions before the call,
        # plus any leading positions the call did not output (``logits_to_keep``).
        offset = 0
        if step < self._n_steps:
            offset = self._offsets[step] + max(0, self._lengths[step] - length)
        todo: list[_Todo] = []
        for r, iv, b in self._entries.get(site, ()):
            steps = self._steps_of(iv)
            if steps is not None and step not in steps:
                continue
            rest = list(b.index[1:])
            if has_pos and rest:
                loc = localize(rest[0], offset, length)
                if loc is None:
                    continue  # the selected positions are not in this call
                rest[0] = loc
            todo.append((r, iv, b, rest))
        return todo

    def _row_index(self, touched: list[int], device: torch.device
                   ) -> slice | torch.Tensor | None:
        """The batch rows of the ``touched`` sets: None = all, a slice when contiguous."""
        rows = self.rows_per_set
        if touched == list(range(touched[0], touched[-1] + 1)):
            if len(touched) < self.n_sets:
                return slice(touched[0] * rows, (touched[-1] + 1) * rows)
            return None
        return torch.cat([torch.arange(r * rows, (r + 1) * rows) for r in touched]).to(device)

    def _compose(self, todo: list[_Todo], touched: list[int], step: int, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, bool]:
        """M, A, S over the touched rows, and which of them are needed (module doc)."""
        rows = self.rows_per_set
        shape = tuple(value.shape)
        block = {r: i for i, r in enumerate(touched)}
        sub_shape = (len(touched) * rows, *shape[1:])
        dev, dt = value.device, value.dtype
        has_set = any(iv.kind != "scale" for _, iv, _, _ in todo)
        has_scale = any(iv.kind == "scale" for _, iv, _, _ in todo)
        # Tensors a kind does not need are not allocated (the hook skips them too).
        empty = value.new_empty(0)
        m = torch.zeros(sub_shape, dtype=torch.bool, device=dev) if has_set else empty
        a = torch.zeros(sub_shape, dtype=dt, device=dev) if has_set else empty
        s = torch.ones(sub_shape, dtype=dt, device=dev) if has_scale else empty
        for r, iv, b, rest in todo:
            i = block[r]
            rsel = (slice(i * rows, (i + 1) * rows), *rest)
            if iv.kind == "scale":
                assert iv.factor is not None
                s[rsel] *= iv.factor
                if has_set:
                    a[rsel] *= iv.factor
                continue
            if has_scale:
                s[rsel] = 1
            m[rsel] = True
            a[rsel] = 0 if iv.kind == "zero" else self._donor(iv, b, step, value, rest)
        return m, a, s, has_set, has_scale

    def _donor(self, iv: Intervention, b: BoundSite, step: int, value: torch.Tensor,
               rest: list[Any]) -> torch.Tensor:
        """The donor values of the selected entries (one set's rows), coverage checked."""
        rows = self.rows_per_set
        full = (rows, *value.shape[1:])
        local = (slice(None), *rest)
        donor, cov = self._donor_fn(iv, b, step, full)
        if cov is not None and value.dim() >= 3:
            view = cov.to(value.device).view(1, value.shape[1], *([1] * (value.dim() - 2)))
            if not bool(view.expand(*full)[local].all()):
                raise InterventionError(
                    f"{iv.label}: the donor has fewer positions than the incident at step "
                    f"{step} (aligned from the end), and the selector reaches positions "
                    "without a donor counterpart; select positions within the donor's "
                    "length (e.g. [pos=-k:]) or use a donor of the incident's length")
        return donor.to(device=value.device, dtype=value.dtype)[local]

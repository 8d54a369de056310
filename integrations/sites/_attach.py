"""Hook resolved sites on a model: observe (record) or replace (intervene) their values.

One forward hook and/or one forward pre-hook per needed module, everything precomputed when
attaching; several sites on the same module compose in one forward pass.

Example::

    seen = {}
    with attach(model, resolve_sites(model, ["blocks.*.resid_post"]),
                lambda b, v: seen.__setitem__(b.site, v.detach().clone())):
        model(input_ids=ids)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch

from integrations.errors import InterventionError, SiteError
from integrations.sites._resolve import BoundSite

__all__ = ["Attachment", "SiteFn", "attach"]

#: ``fn(bound_site, full_value) -> replacement or None``.
SiteFn = Callable[[BoundSite, torch.Tensor], "torch.Tensor | None"]


def _first_param(module: torch.nn.Module) -> str | None:
    """Name of the first argument of ``module.forward`` (to find it when passed by keyword)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return None
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return p.name
    return None


def _apply(
    fn: SiteFn,
    sites: tuple[BoundSite, ...],
    value: torch.Tensor,
    heads: tuple[int, int] | None,
) -> torch.Tensor | None:
    """Call ``fn`` for each site in order; return the final replacement (flat) or None."""
    cur = value.unflatten(-1, heads) if heads is not None else value  # canonical view
    changed = False
    for b in sites:
        r = fn(b, cur)
        if r is None or r is cur:
            continue
        if not isinstance(r, torch.Tensor):
            raise InterventionError(
                f"site function returned {type(r).__name__} for {b.site!r}; return a tensor "
                "of the site's shape, or None to leave the value unchanged"
            )
        if r.shape != cur.shape or r.dtype != cur.dtype:
            raise InterventionError(
                f"replacement for {b.site!r} has shape {tuple(r.shape)} / {r.dtype}, expected "
                f"{tuple(cur.shape)} / {cur.dtype}: replace the full tensor (apply b.index "
                "yourself) and cast with .to(value.dtype)"
            )
        cur, changed = r, True
    if not changed:
        return None
    return cur.flatten(-2) if heads is not None else cur


def _extract(output: Any, path: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    to_tuple = getattr(output, "to_tuple", None)
    if callable(to_tuple):  # transformers ModelOutput
        first = to_tuple()[0]
        if isinstance(first, torch.Tensor):
            return first
    raise SiteError(
        f"module {path!r} returned {type(output).__name__}, which has no leading tensor to "
        "hook; choose a submodule whose output is a tensor (torch:<path>)"
    )


def _rebuild(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if type(output) is tuple:
        return (new, *output[1:])
    if type(output) is list:
        return [new, *output[1:]]
    if isinstance(output, tuple):  # namedtuple
        return type(output)(new, *output[1:])
    output[next(iter(output.keys()))] = new  # ModelOutput
    return output


def _heads_of(group: Sequence[BoundSite]) -> tuple[int, int] | None:
    heads = {b.heads for b in group}
    if len(heads) != 1:
        raise SiteError(
            f"sites on {group[0].module_path!r} disagree on the head view: {sorted(map(str, heads))}"
        )
    return heads.pop()


def _output_hook(fn: SiteFn, group: tuple[BoundSite, ...], path: str) -> Callable[..., Any]:
    heads = _heads_of(group)

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        new = _apply(fn, group, _extract(output, path), heads)
        return None if new is None else _rebuild(output, new)

    return hook


def _input_hook(
    fn: SiteFn, group: tuple[BoundSite, ...], path: str, name: str | None
) -> Callable[..., Any]:
    heads = _heads_of(group)

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            new = _apply(fn, group, args[0], heads)
            return None if new is None else ((new, *args[1:]), kwargs)
        if name is not None and name in kwargs:
            new = _apply(fn, group, kwargs[name], heads)
            if new is None:
                return None
            kwargs = dict(kwargs)
            kwargs[name] = new
            return args, kwargs
        raise SiteError(
            f"module {path!r} was called without its input {name!r} (positionally or by "
            f"keyword), so sites {[b.site for b in group]} cannot be read"
        )

    return hook


class Attachment:
    """Installed hooks for a set of sites; a context manager that always removes them.

    Created by :func:`attach`. Hooks are live from construction until :meth:`remove` (called by
    ``__exit__``, also on exceptions). They are *prepended* to the module's hooks: a later
    attachment runs before earlier ones (and before hooks transformers installs for
    ``output_hidden_states``), so every earlier observer sees the value the model really uses.
    """

    def __init__(self, model: torch.nn.Module, sites: Iterable[BoundSite], fn: SiteFn) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        groups: dict[tuple[str, str], list[BoundSite]] = {}
        for b in sites:
            if not isinstance(b, BoundSite):
                raise SiteError(f"attach() takes BoundSite objects from resolve_sites(), got {b!r}")
            groups.setdefault((b.module_path, b.point), []).append(b)
        self.sites: tuple[BoundSite, ...] = tuple(b for g in groups.values() for b in g)
        try:
            for (path, point), group in groups.items():
                try:
                    module = model.get_submodule(path)
                except AttributeError as e:
                    raise SiteError(
                        f"module {path!r} not found on {type(model).__name__}: were these sites "
                        "resolved on a different model?"
                    ) from e
                if point == "output":
                    h = module.register_forward_hook(
                        _output_hook(fn, tuple(group), path), prepend=True
                    )
                else:
                    h = module.register_forward_pre_hook(
                        _input_hook(fn, tuple(group), path, _first_param(module)),
                        with_kwargs=True,
                        prepend=True,
                    )
                self._handles.append(h)
        except BaseException:
            self.remove()
            raise

    @property
    def active(self) -> bool:
        """True while the hooks are installed."""
        return bool(self._handles)

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def attach(model: torch.nn.Module, bound_sites: Iterable[BoundSite], fn: SiteFn) -> Attachment:
    """Hook ``bound_sites`` on ``model`` and call ``fn(site, full_value)`` on every forward call.

    ``full_value`` is the site's canonical full tensor (a view of what the model computed,
    selectors not applied: use ``value[site.index]``). Return None to observe, or a tensor of
    the same shape and dtype to replace the value in the forward pass. Sites on the same module
    run in the given order, each seeing the previous replacement; a later ``attach`` runs before
    an earlier one on the same module. Hooks are removed on exit.

    Example::

        def zero_neuron(b, v):
            v = v.clone(); v[b.index] = 0; return v
        with attach(model, resolve_sites(model, ["blocks.0.mlp.post[neuron=17]"]), zero_neuron):
            logits = model(input_ids=ids).logits
    """
    return Attachment(model, bound_sites, fn)

"""Resolve site strings against a real model into concrete :class:`BoundSite` objects.

Wildcards, ranges and negative layers are expanded against the model's block count; ``*``
selectors expand to one site per index (heads, MLP neurons, or positions when ``seq_len`` is
given). Unknown names fail here, early, with the nearest valid names.

Example::

    bound = resolve_sites(model, ["blocks.*.resid_post", "blocks.0.attn.z[head=*]"])
    bound[0].site, bound[0].module_path        # ('blocks.0.resid_post', 'model.layers.0')
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from integrations.errors import SiteError
from integrations.sites._arch import ModelLayout, Point, model_layout
from integrations.sites._spec import SelectorValue, SiteSpec, parse_site

__all__ = ["BoundSite", "resolve_sites"]


@dataclass(frozen=True, slots=True)
class BoundSite:
    """One concrete site on one model: what to hook and how to select inside its full tensor.

    ``site`` canonical concrete string (``blocks.2.resid_post``, ``blocks.0.attn.z[head=3]``);
    ``base`` the site without selectors; ``module_path`` the hooked torch module; ``point``
    ``"output"`` or ``"input"`` (which side of the module carries the value); ``index`` a tuple
    index into the canonical full tensor implementing the selectors (a single integer drops its
    dim, a ``|``-list keeps it; ``value[b.index]``); ``kind`` (``"mlp.post"``, ``"torch"``...),
    ``layer`` (block index or None); ``heads`` ``(n_heads, d_head)`` for ``attn.z`` (the hooked
    ``[batch, pos, n_heads*d_head]`` input is viewed as ``[batch, pos, n_heads, d_head]``).
    """

    site: str
    base: str
    module_path: str
    index: tuple[Any, ...]
    kind: str
    layer: int | None
    point: Point
    heads: tuple[int, int] | None = None

    def __str__(self) -> str:
        return self.site

    def __hash__(self) -> int:  # index may hold slices, unhashable before Python 3.12
        return hash((self.site, self.module_path, self.point))


def _nearest(name: str, layout: ModelLayout) -> list[str]:
    return difflib.get_close_matches(name, layout.site_names(), n=5, cutoff=0.5)


def _expand_value(key: str, v: SelectorValue, size: int | None, site: str) -> list[SelectorValue]:
    """Concrete choices for one selector: ``*`` -> one per index; ints range-checked."""
    if v.wildcard:
        if size is None:
            if key == "pos":
                raise SiteError(
                    f"[pos=*] in {site!r} cannot be expanded without a sequence length: write an "
                    "explicit range such as [pos=0:8] or pass resolve_sites(..., seq_len=N)"
                )
            raise SiteError(
                f"[{key}=*] in {site!r} cannot be expanded: the size of that dimension is not "
                f"known for this module; list indices explicitly, e.g. [{key}=0|1|2]"
            )
        return [SelectorValue(ints=(i,)) for i in range(size)]
    if v.ints and size is not None and key != "pos":
        bad = [i for i in v.ints if not -size <= i < size]
        if bad:
            raise SiteError(
                f"{key} index {bad[0]} out of range in {site!r}: valid {key} indices are "
                f"0..{size - 1}"
            )
        return [SelectorValue(ints=tuple(i % size for i in v.ints))]
    return [v]


def _entry(v: SelectorValue) -> Any:
    if v.slice is not None:
        return slice(*v.slice)
    if len(v.ints) == 1:
        return v.ints[0]
    return tuple(v.ints)


def _build_index(kind: str, ndim: int, sel: dict[str, SelectorValue], site: str) -> tuple[Any, ...]:
    """Tuple index into the canonical full tensor (batch first) for concrete selectors."""
    lists = [k for k, v in sel.items() if v.slice is None and len(v.ints) > 1]
    if kind == "torch":
        if len(lists) > 1:
            raise SiteError(
                f"{site!r}: at most one '|'-list selector on a torch: site; split it into "
                "several sites"
            )
        idx: list[Any] = [slice(None)]
        if "pos" in sel:
            idx.append(_entry(sel["pos"]))
        if "neuron" in sel:
            idx += [Ellipsis, _entry(sel["neuron"])]
        return tuple(idx) if len(idx) > 1 else ()
    dims = {"pos": 1, "head": 2, "neuron": ndim - 1}
    full: list[Any] = [slice(None)] * ndim
    for key, v in sel.items():
        full[dims[key]] = _entry(v)
    if len(lists) == 2:  # pos list x head/neuron list: outer product (np.ix_ style)
        a, b = sorted(lists, key=lambda k: dims[k])
        full[dims[a]] = tuple((i,) for i in sel[a].ints)  # [n_a, 1]
        full[dims[b]] = (tuple(sel[b].ints),)  # [1, n_b]
    while full and full[-1] == slice(None):
        full.pop()
    return tuple(full)


def _torch_size(module: Any) -> int | None:
    n = getattr(module, "out_features", None)
    if isinstance(n, int):
        return n
    nf = getattr(module, "nf", None)  # HF Conv1D
    return nf if isinstance(nf, int) else None


_Base = tuple[str, str, Point, bool, int | None]  # base site, module path, point, heads, layer


def _bases(spec: SiteSpec, layout: ModelLayout) -> list[_Base]:
    """The concrete base sites (no selectors) ``spec`` names on this model, with their hooks."""
    site = spec.canonical
    if spec.kind == "torch":
        path = spec.torch_path or ""
        if path not in layout.module_names:
            near = difflib.get_close_matches(path, sorted(layout.module_names), n=5, cutoff=0.5)
            raise SiteError(
                f"no module {path!r} in {layout.model_class} for site {site!r}"
                + (f"; nearest: {', '.join('torch:' + n for n in near)}" if near else "")
                + " (see model.named_modules())",
                suggestions=[f"torch:{n}" for n in near],
            )
        return [(spec.base, path, "output", False, None)]
    if spec.layer is None:
        hp = layout.hook_for(spec.kind)
        return [(spec.kind, hp.module_path, hp.point, hp.heads, None)]
    layout.hook_for(spec.kind, 0)  # the clear 'unknown architecture' error, before sizes
    layers = spec.layer.select(layout.n_layers)
    if not layers:
        raise SiteError(
            f"layer range {spec.layer.text!r} in {site!r} selects no blocks: this model has "
            f"{layout.n_layers} blocks (0..{layout.n_layers - 1})"
        )
    out: list[_Base] = []
    for i in layers:
        hp = layout.hook_for(spec.kind, i)
        out.append((f"blocks.{i}.{spec.kind}", hp.module_path, hp.point, hp.heads, i))
    return out


def _resolve_one(
    model: Any, spec: SiteSpec, layout: ModelLayout, seq_len: int | None
) -> list[BoundSite]:
    site = spec.canonical
    has_pos = not (spec.kind == "unembed" and not layout.unembed_has_pos)
    ndim = 4 if spec.kind == "attn.z" else (3 if has_pos else 2)
    out: list[BoundSite] = []
    for base, path, point, heads, layer in _bases(spec, layout):
        if path not in layout.module_names:
            raise SiteError(
                f"site {base!r} is not available on {layout.model_class}: its module {path!r} "
                "does not exist (non-standard block layout); use a torch: path instead",
                suggestions=_nearest(base, layout),
            )
        sizes: dict[str, int | None] = {"pos": seq_len, "head": layout.n_heads}
        sizes["neuron"] = (
            _torch_size(model.get_submodule(path)) if spec.kind == "torch" else layout.d_mlp
        )
        if not has_pos and spec.selector("pos") is not None:
            raise SiteError(
                f"{site!r}: this model's unembed ({path}) is a pooled classifier with output "
                "[batch, n_labels]; it has no pos dimension, drop the [pos=...] selector"
            )
        keys = [k for k, _ in spec.selectors]
        choices = [_expand_value(k, v, sizes[k], site) for k, v in spec.selectors]
        for combo in itertools.product(*choices):
            sel = dict(zip(keys, combo))
            text = base + "".join(f"[{k}={v.text}]" for k, v in sel.items())
            out.append(
                BoundSite(
                    site=text,
                    base=base,
                    module_path=path,
                    index=_build_index(spec.kind, ndim, sel, text),
                    kind=spec.kind,
                    layer=layer,
                    point=point,
                    heads=(layout.n_heads, layout.d_head) if heads else None,
                )
            )
    return out


def resolve_sites(
    model: Any, specs: str | SiteSpec | Iterable[str | SiteSpec], *, seq_len: int | None = None
) -> list[BoundSite]:
    """Resolve site strings on ``model`` into concrete :class:`BoundSite` objects, in order.

    Layer wildcards/ranges/negatives are expanded against the model's blocks, ``*`` selectors
    into one site per index (``pos=*`` needs ``seq_len``). Duplicates (same canonical site) are
    kept once. Raises :class:`SiteError` listing the nearest valid names for unknown sites.

    Example::

        resolve_sites(model, ["blocks.-1.mlp.post[neuron=*]"])   # d_mlp BoundSites
    """
    if isinstance(specs, (str, SiteSpec)):
        specs = [specs]
    layout = model_layout(model)
    seen: set[str] = set()
    out: list[BoundSite] = []
    for s in specs:
        try:
            spec = s if isinstance(s, SiteSpec) else parse_site(s)
        except SiteError as e:
            if e.suggestions or not isinstance(s, str):
                raise
            near = _nearest("".join(s.split()).split("[", 1)[0], layout)
            raise SiteError(str(e), suggestions=near) from None
        for b in _resolve_one(model, spec, layout, seq_len):
            if b.site not in seen:
                seen.add(b.site)
                out.append(b)
    return out

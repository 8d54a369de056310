"""Site-string grammar: parse a site string into a :class:`SiteSpec` and print its canonical form.

Syntax only — no model is needed. Resolution against a model lives in ``_resolve``.

Example::

    spec = parse_site("blocks.-1.mlp.post[ neuron=17|90 ][pos=-1]")
    spec.canonical            # 'blocks.-1.mlp.post[neuron=17|90][pos=-1]'
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from integrations.errors import SiteError

__all__ = [
    "BLOCK_KINDS",
    "SELECTOR_KEYS",
    "TOP_KINDS",
    "LayerSpec",
    "SelectorValue",
    "SiteSpec",
    "canonical_site",
    "parse_site",
]

#: Per-block site kinds, in residual-stream order.
BLOCK_KINDS: tuple[str, ...] = ("resid_pre", "attn", "attn.z", "mlp", "mlp.post", "resid_post")
#: Model-level site kinds.
TOP_KINDS: tuple[str, ...] = ("embed", "ln_final", "unembed")
#: Selector keys: ``pos`` (dim 1), ``head`` (dim 2 of attn.z), ``neuron`` (last dim).
SELECTOR_KEYS: tuple[str, ...] = ("head", "neuron", "pos")

_TORCH_PREFIX = "torch:"

_INT = r"[+-]?\d+"
_SLICE_RE = re.compile(rf"^({_INT})?:({_INT})?(?::({_INT})?)?$")
_INT_RE = re.compile(rf"^{_INT}$")
_TORCH_PATH_RE = re.compile(r"^[A-Za-z_0-9]+(\.[A-Za-z_0-9]+)*$")
_SELECTOR_RE = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """Which blocks a ``blocks.<layer>.<kind>`` site names.

    Exactly one of: ``index`` (may be negative), ``range`` (python slice semantics, end
    exclusive) or ``wildcard`` (every block).
    """

    index: int | None = None
    range: tuple[int | None, int | None, int | None] | None = None
    wildcard: bool = False

    @property
    def text(self) -> str:
        """Canonical text of the layer token, e.g. ``-1``, ``0:4`` or ``*``."""
        return _token_text(self.wildcard, self.range, str(self.index))

    def select(self, n_layers: int) -> list[int]:
        """Concrete non-negative layer indices on a model with ``n_layers`` blocks."""
        if self.wildcard:
            return list(range(n_layers))
        if self.range is not None:
            return list(range(n_layers))[slice(*self.range)]
        assert self.index is not None
        if not -n_layers <= self.index < n_layers:
            raise SiteError(
                f"layer {self.index} is out of range: this model has {n_layers} blocks, valid "
                f"layers are 0..{n_layers - 1} (or -{n_layers}..-1 from the end)"
            )
        return [self.index % n_layers]


@dataclass(frozen=True, slots=True)
class SelectorValue:
    """The value of one selector: ``*``, a slice ``a:b`` or a ``|``-list of integers."""

    wildcard: bool = False
    slice: tuple[int | None, int | None, int | None] | None = None
    ints: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        """Canonical text, e.g. ``*``, ``0:8``, ``17|90``."""
        return _token_text(self.wildcard, self.slice, "|".join(str(i) for i in self.ints))


@dataclass(frozen=True, slots=True)
class SiteSpec:
    """A parsed (not yet resolved) site string.

    ``kind`` is one of :data:`BLOCK_KINDS`, :data:`TOP_KINDS` or ``"torch"``; ``layer`` is set
    for block kinds; ``torch_path`` for raw ``torch:`` module paths; ``selectors`` is sorted by
    key.
    """

    kind: str
    layer: LayerSpec | None = None
    torch_path: str | None = None
    selectors: tuple[tuple[str, SelectorValue], ...] = ()

    @property
    def base(self) -> str:
        """The site without selectors, e.g. ``blocks.*.mlp.post``."""
        if self.kind == "torch":
            return f"{_TORCH_PREFIX}{self.torch_path}"
        if self.layer is not None:
            return f"blocks.{self.layer.text}.{self.kind}"
        return self.kind

    @property
    def canonical(self) -> str:
        """Canonical string: no spaces, selectors sorted by key."""
        return self.base + "".join(f"[{k}={v.text}]" for k, v in self.selectors)

    def selector(self, key: str) -> SelectorValue | None:
        """The value of selector ``key`` or None."""
        for k, v in self.selectors:
            if k == key:
                return v
        return None

    def __str__(self) -> str:
        return self.canonical


def _token_text(wildcard: bool, rng: tuple[int | None, int | None, int | None] | None,
                integers: str) -> str:
    """Canonical text of a layer token or selector value: ``*``, a slice, or the integers."""
    if wildcard:
        return "*"
    if rng is not None:
        return _slice_text(rng)
    return integers


def _slice_text(s: tuple[int | None, int | None, int | None]) -> str:
    start, stop, step = s
    text = f"{'' if start is None else start}:{'' if stop is None else stop}"
    return text if step is None else f"{text}:{step}"


def _parse_slice(text: str) -> tuple[int | None, int | None, int | None] | None:
    m = _SLICE_RE.match(text)
    if m is None:
        return None
    start, stop, step = (None if g is None else int(g) for g in m.groups())
    if step == 0:
        raise SiteError(f"slice step cannot be zero in {text!r}")
    return (start, stop, step)


def _generic_names(layer_text: str) -> list[str]:
    return [f"blocks.{layer_text}.{k}" for k in BLOCK_KINDS] + list(TOP_KINDS)


def _unknown(name: str, layer_text: str = "0") -> SiteError:
    suggestions = difflib.get_close_matches(name, _generic_names(layer_text), n=5, cutoff=0.5)
    hint = f"; nearest valid: {', '.join(suggestions)}" if suggestions else ""
    return SiteError(
        f"unknown site {name!r}{hint}. Valid forms: blocks.<i>.<{'|'.join(BLOCK_KINDS)}>, "
        f"{', '.join(TOP_KINDS)}, or torch:<module.path>",
        suggestions=suggestions,
    )


def _parse_layer(token: str, name: str) -> LayerSpec:
    if token == "*":
        return LayerSpec(wildcard=True)
    if _INT_RE.match(token):
        return LayerSpec(index=int(token))
    rng = _parse_slice(token)
    if rng is None:
        raise SiteError(
            f"bad layer {token!r} in site {name!r}: use an integer (may be negative, e.g. -1), "
            "'*' for every block, or a range like 0:4 (end exclusive)"
        )
    return LayerSpec(range=rng)


def _parse_value(key: str, text: str, site: str) -> SelectorValue:
    if text == "*":
        return SelectorValue(wildcard=True)
    rng = _parse_slice(text)
    if rng is not None:
        return SelectorValue(slice=rng)
    parts = text.split("|")
    if parts and all(_INT_RE.match(p) for p in parts):
        return SelectorValue(ints=tuple(int(p) for p in parts))
    raise SiteError(
        f"bad value {text!r} for selector {key!r} in {site!r}: use an integer (e.g. {key}=-1), "
        f"a list ({key}=17|90), a range ({key}=0:8) or '*' (one site per index)"
    )


def _parse_selectors(text: str, site: str) -> tuple[tuple[str, SelectorValue], ...]:
    pos = 0
    out: dict[str, SelectorValue] = {}
    for m in _SELECTOR_RE.finditer(text):
        if m.start() != pos:
            break
        pos = m.end()
        body = m.group(1)
        if "=" not in body:
            raise SiteError(f"selector [{body}] in {site!r} needs key=value, e.g. [pos=-1]")
        key, value = body.split("=", 1)
        if key not in SELECTOR_KEYS:
            near = difflib.get_close_matches(key, SELECTOR_KEYS, n=3, cutoff=0.4)
            raise SiteError(
                f"unknown selector key {key!r} in {site!r}; valid keys: {', '.join(SELECTOR_KEYS)}",
                suggestions=near,
            )
        if key in out:
            raise SiteError(f"selector {key!r} given twice in {site!r}; merge with '|'")
        out[key] = _parse_value(key, value, site)
    if pos != len(text):
        raise SiteError(
            f"malformed selectors {text[pos:]!r} in {site!r}: write them as [key=value] groups "
            "directly after the site name, e.g. blocks.0.mlp.post[neuron=17|90][pos=-1]"
        )
    return tuple(sorted(out.items()))


def parse_site(site: str) -> SiteSpec:
    """Parse a site string (syntax only, no model) into a :class:`SiteSpec`.

    Example::

        parse_site("blocks.-1.mlp.post[neuron=17|90]").canonical
        # 'blocks.-1.mlp.post[neuron=17|90]'

    Raises :class:`SiteError` (with ``suggestions``) for bad syntax or unknown names.
    """
    if not isinstance(site, str):
        raise SiteError(f"a site must be a string, got {type(site).__name__}")
    text = "".join(site.split())
    if not text:
        raise SiteError("empty site string; e.g. 'blocks.0.resid_post'")
    bracket = text.find("[")
    name, sel_text = (text, "") if bracket < 0 else (text[:bracket], text[bracket:])
    selectors = _parse_selectors(sel_text, text)
    if name.startswith(_TORCH_PREFIX):
        path = name[len(_TORCH_PREFIX) :]
        if not _TORCH_PATH_RE.match(path):
            raise SiteError(
                f"bad torch module path {path!r} in {text!r}: use the dotted name from "
                "model.named_modules(), e.g. torch:transformer.h.0.mlp"
            )
        spec = SiteSpec(kind="torch", torch_path=path, selectors=selectors)
    elif name in TOP_KINDS:
        spec = SiteSpec(kind=name, selectors=selectors)
    elif name.startswith("blocks."):
        rest = name[len("blocks.") :]
        token, _, kind = rest.partition(".")
        if kind not in BLOCK_KINDS:
            raise _unknown(name, token or "0")
        spec = SiteSpec(kind=kind, layer=_parse_layer(token, text), selectors=selectors)
    else:
        raise _unknown(name)
    _check_selectors(spec, text)
    return spec


def _check_selectors(spec: SiteSpec, site: str) -> None:
    """Architecture-independent selector rules (dims are checked again at resolution)."""
    for key, _ in spec.selectors:
        if key == "head" and spec.kind != "attn.z":
            raise SiteError(
                f"selector 'head' is only valid on blocks.<i>.attn.z (per-head attention "
                f"outputs), not on {spec.base!r} in {site!r}; e.g. blocks.0.attn.z[head=5]"
            )
        if key == "neuron" and spec.kind not in ("mlp.post", "torch"):
            raise SiteError(
                f"selector 'neuron' selects MLP neurons and is only valid on blocks.<i>.mlp.post "
                f"(or a torch: path's last dimension), not {spec.base!r}"
            )


def canonical_site(site: str) -> str:
    """Canonical form of a site string: no spaces, selectors sorted by key.

    Example::

        canonical_site("blocks.0.mlp.post[ neuron=1 ][pos=-1]")
        # 'blocks.0.mlp.post[neuron=1][pos=-1]'
    """
    return parse_site(site).canonical

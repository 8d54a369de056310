"""Canonical site address space (DESIGN §4): name, resolve and hook places inside a model.

Site strings are the same on every supported architecture (GPT-2, BERT, Llama-family) and map
to modules through per-architecture alias tables; ``torch:<module.path>`` addresses any module.

Example::

    from integrations.sites import attach, canonical_site, parse_site, resolve_sites
    canonical_site("blocks.0.mlp.post[ neuron=1 ][pos=-1]")  # 'blocks.0.mlp.post[neuron=1][pos=-1]'
    bound = resolve_sites(model, ["blocks.*.resid_post", "blocks.0.attn.z[head=*]"])
    with attach(model, bound, lambda b, v: None):            # fn(site, full tensor) -> None | Tensor
        model(**inputs)

Canonical full-tensor shapes (batch first): ``embed``, ``blocks.i.resid_pre|attn|mlp|resid_post``,
``ln_final``: ``[batch, pos, d_model]``; ``blocks.i.attn.z``: ``[batch, pos, n_heads, d_head]``;
``blocks.i.mlp.post``: ``[batch, pos, d_mlp]``; ``unembed``: ``[batch, pos, vocab]`` (a pooled
classifier such as BERT's: ``[batch, n_labels]``).

``parse_site``/``canonical_site``/``resolve_sites`` do not import torch; ``attach`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from integrations._lazy import lazy_exports
from integrations.sites._arch import HookPoint, ModelLayout, model_layout
from integrations.sites._resolve import BoundSite, resolve_sites
from integrations.sites._spec import (
    BLOCK_KINDS,
    SELECTOR_KEYS,
    TOP_KINDS,
    LayerSpec,
    SelectorValue,
    SiteSpec,
    canonical_site,
    parse_site,
)

if TYPE_CHECKING:
    from integrations.sites._attach import Attachment, SiteFn, attach

__all__ = [
    "BLOCK_KINDS",
    "SELECTOR_KEYS",
    "TOP_KINDS",
    "Attachment",
    "BoundSite",
    "HookPoint",
    "LayerSpec",
    "ModelLayout",
    "SelectorValue",
    "SiteFn",
    "SiteSpec",
    "attach",
    "canonical_site",
    "model_layout",
    "parse_site",
    "resolve_sites",
]

# torch is imported only when hooks are needed
__getattr__, __dir__ = lazy_exports(__name__, {"Attachment": "._attach", "SiteFn": "._attach",
                                               "attach": "._attach"})

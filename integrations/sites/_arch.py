"""Per-architecture alias tables: where each canonical site lives in a Hugging Face model.

:func:`model_layout` inspects a model (``config.model_type`` first, then module structure) and
returns a :class:`ModelLayout` with the sizes needed to expand sites and a lookup from a
canonical kind + layer to the hooked module.

Example::

    layout = model_layout(model)
    layout.arch, layout.n_layers, layout.n_heads       # ('llama', 30, 9)
    layout.hook_for("mlp.post", 2)                     # HookPoint('model.layers.2.mlp.down_proj', 'input', False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from integrations.errors import SiteError

__all__ = ["HookPoint", "ModelLayout", "Point", "model_layout"]

Point = Literal["output", "input"]


@dataclass(frozen=True, slots=True)
class HookPoint:
    """A module and which side of it carries a site.

    ``point="output"``: the module's output (``[0]`` of a tuple output); ``"input"``: its first
    positional argument (or the same argument passed by keyword). ``heads``: the last dim is
    viewed as ``[n_heads, d_head]``.
    """

    module_path: str
    point: Point
    heads: bool = False


@dataclass(frozen=True, slots=True)
class _Alias:
    path: str  # relative to the base-model prefix; "{i}" is the layer index
    point: Point
    heads: bool = False


@dataclass(frozen=True)
class _ArchTable:
    name: str
    model_types: frozenset[str]
    prefixes: tuple[str, ...]  # where the base model sits inside task models
    layers: str  # ModuleList of blocks, relative to the prefix
    block: dict[str, _Alias]
    embed: _Alias
    ln_final: _Alias | None
    unembed: tuple[tuple[str, bool], ...]  # (absolute module path, output has a pos dim)
    no_ln_final: str = ""  # why ln_final does not exist (when ln_final is None)

    def probe(self, prefix: str) -> list[str]:
        """Module paths of block 0 that identify the layout: the inputs of attn.z and mlp.post
        (the attention output and MLP down projections)."""
        return [prefix + self.block[k].path.format(i=0) for k in ("attn.z", "mlp.post")]


def _blocks(layers: str, *, attn: str, z: str, mlp: str, post: str) -> dict[str, _Alias]:
    """The six block sites, the same on every architecture relative to its modules: the block's
    input/output, the attention and MLP modules' outputs, and the inputs of the attention
    output projection (per head) and the MLP down projection (neurons)."""
    block = f"{layers}.{{i}}"
    return {
        "resid_pre": _Alias(block, "input"),
        "attn": _Alias(f"{block}.{attn}", "output"),
        "attn.z": _Alias(f"{block}.{z}", "input", heads=True),
        "mlp": _Alias(f"{block}.{mlp}", "output"),
        "mlp.post": _Alias(f"{block}.{post}", "input"),
        "resid_post": _Alias(block, "output"),
    }


_GPT2 = _ArchTable(
    name="gpt2",
    model_types=frozenset({"gpt2"}),
    prefixes=("transformer.", ""),
    layers="h",
    block=_blocks("h", attn="attn", z="attn.c_proj", mlp="mlp", post="mlp.c_proj"),
    # GPT-2 adds wte + wpe inline; `drop` is the first module that sees their sum.
    embed=_Alias("drop", "output"),
    ln_final=_Alias("ln_f", "output"),
    unembed=(("lm_head", True), ("score", True)),
)

_LLAMA = _ArchTable(
    name="llama",
    model_types=frozenset({"llama", "qwen2", "qwen3", "mistral", "smollm3", "olmo2"}),
    prefixes=("model.", "", "model.language_model.", "language_model.model."),
    layers="layers",
    block=_blocks("layers", attn="self_attn", z="self_attn.o_proj", mlp="mlp",
                  post="mlp.down_proj"),
    embed=_Alias("embed_tokens", "output"),
    ln_final=_Alias("norm", "output"),
    unembed=(("lm_head", True), ("score", True)),
)

# BERT is post-LN: `attn`/`mlp` are the sublayer contributions *before* residual add + LayerNorm.
_BERT = _ArchTable(
    name="bert",
    model_types=frozenset({"bert", "roberta", "xlm-roberta"}),
    prefixes=("bert.", "roberta.", ""),
    layers="encoder.layer",
    block=_blocks("encoder.layer", attn="attention.output.dense", z="attention.output.dense",
                  mlp="output.dense", post="output.dense"),
    embed=_Alias("embeddings", "output"),
    ln_final=None,
    no_ln_final=(
        "BERT is post-LN and has no final layer norm (ln_final does not exist); every block's "
        "resid_post is already normalised: use blocks.-1.resid_post instead"
    ),
    unembed=(("classifier", False), ("cls", True), ("lm_head", True)),
)

_TABLES: tuple[_ArchTable, ...] = (_GPT2, _LLAMA, _BERT)


@dataclass(frozen=True)
class ModelLayout:
    """What the sites package knows about one model: architecture, sizes and alias lookups.

    ``arch`` is ``"gpt2"``, ``"llama"``, ``"bert"`` or ``"unknown"`` (only ``torch:`` paths).
    Sizes are 0 for an unknown architecture.
    """

    arch: str
    model_class: str
    model_type: str | None
    prefix: str = ""
    n_layers: int = 0
    n_heads: int = 0
    d_head: int = 0
    d_model: int = 0
    d_mlp: int = 0
    unembed_path: str | None = None
    unembed_has_pos: bool = True
    module_names: frozenset[str] = field(default_factory=frozenset, repr=False)
    table: _ArchTable | None = field(default=None, repr=False)

    def hook_for(self, kind: str, layer: int | None = None) -> HookPoint:
        """The module + side carrying canonical ``kind`` (of block ``layer`` for block kinds)."""
        t = self._require_table(kind)
        if kind in t.block:
            assert layer is not None
            a = t.block[kind]
            return HookPoint(self.prefix + a.path.format(i=layer), a.point, a.heads)
        if kind == "embed":
            return HookPoint(self.prefix + t.embed.path, t.embed.point)
        if kind == "ln_final":
            if t.ln_final is None:
                raise SiteError(
                    t.no_ln_final, suggestions=[f"blocks.{self.n_layers - 1}.resid_post"]
                )
            return HookPoint(self.prefix + t.ln_final.path, t.ln_final.point)
        if kind == "unembed":
            if self.unembed_path is None:
                heads = ", ".join(p for p, _ in t.unembed)
                raise SiteError(
                    f"{self.model_class} has no output head (looked for: {heads}), so 'unembed' "
                    "does not exist; load the task model (e.g. *ForCausalLM / "
                    "*ForSequenceClassification) or use ln_final / blocks.-1.resid_post",
                    suggestions=self.site_names(layers=False),
                )
            return HookPoint(self.unembed_path, "output")
        raise SiteError(f"unknown site kind {kind!r}")

    def site_names(self, *, layers: bool = True) -> list[str]:
        """Every concrete canonical base site on this model (for listings and suggestions)."""
        if self.table is None:
            return []
        names = ["embed"]
        if layers:
            names += [f"blocks.{i}.{k}" for i in range(self.n_layers) for k in self.table.block]
        if self.table.ln_final is not None:
            names.append("ln_final")
        if self.unembed_path is not None:
            names.append("unembed")
        return names

    def _require_table(self, kind: str) -> _ArchTable:
        if self.table is None:
            raise SiteError(
                f"canonical site {kind!r} is not available: architecture {self.model_class} "
                f"(model_type={self.model_type!r}) has no alias table (supported: GPT-2, BERT, "
                "Llama-family). Raw module paths still work with the 'torch:' prefix, e.g. "
                + ", ".join(f"torch:{n}" for n in _examples(self.module_names)),
                suggestions=[f"torch:{n}" for n in _examples(self.module_names)],
            )
        return self.table


def _examples(names: frozenset[str]) -> list[str]:
    layered = sorted((n for n in names if ".0." in n), key=lambda n: (n.count("."), n))
    return (layered or sorted(n for n in names if n))[:3]


def _config(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            return get_text()
        except Exception:  # pragma: no cover - odd configs; the plain config still works
            return cfg
    return cfg


def _in_features(module: Any) -> int | None:
    n = getattr(module, "in_features", None)
    if isinstance(n, int):
        return n
    w = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and w is not None:  # HF Conv1D: weight [in, out]
        return int(w.shape[0])
    return None


def _match(modules: dict[str, Any], t: _ArchTable) -> str | None:
    for prefix in t.prefixes:
        layers = modules.get(prefix + t.layers)
        if layers is None or not hasattr(layers, "__len__") or len(layers) == 0:
            continue
        if all(p in modules for p in t.probe(prefix)):
            return prefix
    return None


def _cfg_int(cfg: Any, *names: str) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return 0


def model_layout(model: Any) -> ModelLayout:
    """Detect the architecture of ``model`` and measure the sizes sites expand against.

    Example::

        model_layout(gpt2).n_layers        # 12
    """
    modules: dict[str, Any] = dict(model.named_modules())
    cfg = _config(model)
    model_type = getattr(cfg, "model_type", None)
    cls = type(model).__name__
    ordered = sorted(_TABLES, key=lambda t: model_type not in t.model_types)
    for t in ordered:
        prefix = _match(modules, t)
        if prefix is None:
            continue
        n_layers = len(modules[prefix + t.layers])
        n_heads = _cfg_int(cfg, "num_attention_heads", "n_head")
        d_model = _cfg_int(cfg, "hidden_size", "n_embd", "d_model")
        z_in = _in_features(modules[prefix + t.block["attn.z"].path.format(i=0)])
        d_head = _cfg_int(cfg, "head_dim") if z_in is None else z_in // max(n_heads, 1)
        d_mlp = _in_features(modules[prefix + t.block["mlp.post"].path.format(i=0)]) or _cfg_int(
            cfg, "intermediate_size", "n_inner"
        )
        unembed, has_pos = None, True
        for path, pos in t.unembed:
            if path in modules:
                unembed, has_pos = path, pos
                break
        return ModelLayout(
            arch=t.name,
            model_class=cls,
            model_type=model_type,
            prefix=prefix,
            n_layers=n_layers,
            n_heads=n_heads,
            d_head=d_head,
            d_model=d_model,
            d_mlp=d_mlp,
            unembed_path=unembed,
            unembed_has_pos=has_pos,
            module_names=frozenset(modules),
            table=t,
        )
    return ModelLayout(
        arch="unknown", model_class=cls, model_type=model_type, module_names=frozenset(modules)
    )

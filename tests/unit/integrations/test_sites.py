"""Site strings: parsing, canonical form, resolution against real tiny models, errors."""

from __future__ import annotations

import pytest
import torch

from integrations.errors import SiteError
from integrations.sites import BoundSite, canonical_site, model_layout, parse_site, resolve_sites

# ---------------------------------------------------------------------------- parsing / canonical


@pytest.mark.parametrize(
    ("raw", "canon"),
    [
        ("blocks.0.mlp.post[ neuron=1 ][pos=-1]", "blocks.0.mlp.post[neuron=1][pos=-1]"),
        ("blocks.0.mlp.post[pos=-1][neuron=1]", "blocks.0.mlp.post[neuron=1][pos=-1]"),
        (" blocks . -1 . mlp ", "blocks.-1.mlp"),
        ("blocks.+01.resid_post", "blocks.1.resid_post"),
        ("blocks.*.attn.z[pos=0:8][head=*]", "blocks.*.attn.z[head=*][pos=0:8]"),
        ("blocks.0:4.mlp", "blocks.0:4.mlp"),
        ("blocks.:2.attn", "blocks.:2.attn"),
        ("blocks.-2:.resid_pre", "blocks.-2:.resid_pre"),
        ("blocks.2.mlp.post[neuron=17 | 90]", "blocks.2.mlp.post[neuron=17|90]"),
        ("embed", "embed"),
        ("unembed[pos=-1]", "unembed[pos=-1]"),
        ("ln_final", "ln_final"),
        ("torch:transformer.h.0.mlp", "torch:transformer.h.0.mlp"),
        ("torch:lm_head[pos=-1]", "torch:lm_head[pos=-1]"),
    ],
)
def test_canonical_form(raw: str, canon: str) -> None:
    assert canonical_site(raw) == canon
    assert canonical_site(canon) == canon  # idempotent


def test_parse_site_fields() -> None:
    spec = parse_site("blocks.-1.mlp.post[neuron=17|90][pos=0:8]")
    assert spec.kind == "mlp.post"
    assert spec.layer is not None and spec.layer.index == -1
    assert spec.base == "blocks.-1.mlp.post"
    neuron, pos = spec.selector("neuron"), spec.selector("pos")
    assert neuron is not None and neuron.ints == (17, 90)
    assert pos is not None and pos.slice == (0, 8, None)
    assert spec.selector("head") is None
    assert str(spec) == "blocks.-1.mlp.post[neuron=17|90][pos=0:8]"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "blocks",
        "blocks.0",
        "blocks.x.mlp",
        "blocks.0.mpl",
        "block.0.mlp",
        "mlp",
        "blocks.0.mlp[pos=1",
        "blocks.0.mlp[pos]",
        "blocks.0.mlp[po=1]",
        "blocks.0.mlp[pos=a]",
        "blocks.0.mlp[pos=1][pos=2]",
        "blocks.0.mlp trailing",
        "blocks.0.attn[head=1]",
        "blocks.0.mlp[neuron=3]",
        "blocks.0.resid_post[neuron=3]",
        "torch:",
        "torch:a..b",
        "torch:lm_head[head=1]",
        "blocks.0:4:0.mlp",
    ],
)
def test_bad_syntax_raises_site_error(bad: str) -> None:
    with pytest.raises(SiteError):
        parse_site(bad)


def test_site_error_is_value_error_with_suggestions() -> None:
    with pytest.raises(ValueError) as info:
        parse_site("blocks.0.mpl")
    assert isinstance(info.value, SiteError)
    assert info.value.suggestions[0] == "blocks.0.mlp"
    assert "blocks.0.mlp" in str(info.value)


def test_head_only_on_attn_z_message() -> None:
    with pytest.raises(SiteError, match=r"attn\.z"):
        parse_site("blocks.0.attn[head=1]")


# ---------------------------------------------------------------------------- resolution


def _count(model: torch.nn.Module, *sites: str, **kw: int) -> int:
    return len(resolve_sites(model, list(sites), **kw))


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_bert"])
def test_expansion_counts(fixture: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    cfg = model.config
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    d_mlp = getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size  # GPT-2: n_inner=None
    assert _count(model, "blocks.*.resid_post") == n_layers
    assert _count(model, "blocks.0:2.mlp") == 2
    assert _count(model, "blocks.1:.mlp") == n_layers - 1
    assert _count(model, "blocks.0:100.mlp") == n_layers  # python slice semantics
    assert _count(model, "blocks.0.attn.z[head=*]") == n_heads
    assert _count(model, "blocks.*.attn.z[head=*]") == n_layers * n_heads
    assert _count(model, "blocks.*.mlp.post[neuron=*]") == n_layers * d_mlp
    assert _count(model, "blocks.0.attn.z[head=*][pos=*]", seq_len=5) == n_heads * 5
    # duplicates are kept once, order preserved
    bound = resolve_sites(model, ["blocks.1.mlp", "blocks.*.mlp", "blocks.-1.mlp"])
    assert [b.site for b in bound] == [f"blocks.{i}.mlp" for i in (1, 0, 2)]


def test_concrete_names_and_fields(tiny_llama: torch.nn.Module) -> None:
    (b,) = resolve_sites(tiny_llama, ["blocks.-1.mlp.post[ neuron=-1|3 ][pos=-1]"])
    assert isinstance(b, BoundSite)
    assert b.site == "blocks.2.mlp.post[neuron=63|3][pos=-1]"
    assert b.base == "blocks.2.mlp.post"
    assert b.module_path == "model.layers.2.mlp.down_proj"
    assert (b.kind, b.layer, b.point) == ("mlp.post", 2, "input")
    heads = resolve_sites(tiny_llama, "blocks.0.attn.z[head=*]")
    assert [h.site for h in heads] == [f"blocks.0.attn.z[head={i}]" for i in range(4)]
    assert all(h.heads == (4, 8) for h in heads)
    sliced = resolve_sites(tiny_llama, ["blocks.0.resid_post[pos=0:2]"])[0]
    assert {sliced: 1, b: 2}[sliced] == 1  # hashable even with slices in its index
    assert sliced == resolve_sites(tiny_llama, ["blocks.0.resid_post[pos=0:2]"])[0]


def test_index_selects_expected_shapes(tiny_gpt2: torch.nn.Module) -> None:
    z = torch.randn(2, 5, 4, 8)  # [batch, pos, n_heads, d_head]
    post = torch.randn(2, 5, 128)  # [batch, pos, d_mlp]

    def idx(site: str) -> tuple[object, ...]:
        (b,) = resolve_sites(tiny_gpt2, [site])
        return b.index

    assert z[idx("blocks.0.attn.z[head=3]")].shape == (2, 5, 8)
    assert torch.equal(z[idx("blocks.0.attn.z[head=3]")], z[:, :, 3])
    assert z[idx("blocks.0.attn.z[head=1|2][pos=-1]")].shape == (2, 2, 8)
    assert torch.equal(z[idx("blocks.0.attn.z[head=1|2][pos=0|4]")], z[:, [0, 4]][:, :, [1, 2]])
    assert post[idx("blocks.0.mlp.post[neuron=17|90]")].shape == (2, 5, 2)
    assert post[idx("blocks.0.mlp.post[neuron=7][pos=0:3]")].shape == (2, 3)
    assert idx("blocks.0.mlp.post") == ()


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        (
            "tiny_gpt2",
            {
                "embed": "transformer.drop",
                "blocks.1.resid_pre": "transformer.h.1",
                "blocks.1.attn": "transformer.h.1.attn",
                "blocks.1.attn.z": "transformer.h.1.attn.c_proj",
                "blocks.1.mlp": "transformer.h.1.mlp",
                "blocks.1.mlp.post": "transformer.h.1.mlp.c_proj",
                "blocks.1.resid_post": "transformer.h.1",
                "ln_final": "transformer.ln_f",
                "unembed": "lm_head",
            },
        ),
        (
            "tiny_llama",
            {
                "embed": "model.embed_tokens",
                "blocks.1.resid_pre": "model.layers.1",
                "blocks.1.attn": "model.layers.1.self_attn",
                "blocks.1.attn.z": "model.layers.1.self_attn.o_proj",
                "blocks.1.mlp": "model.layers.1.mlp",
                "blocks.1.mlp.post": "model.layers.1.mlp.down_proj",
                "blocks.1.resid_post": "model.layers.1",
                "ln_final": "model.norm",
                "unembed": "lm_head",
            },
        ),
        (
            "tiny_bert",
            {
                "embed": "bert.embeddings",
                "blocks.1.resid_pre": "bert.encoder.layer.1",
                "blocks.1.attn": "bert.encoder.layer.1.attention.output.dense",
                "blocks.1.attn.z": "bert.encoder.layer.1.attention.output.dense",
                "blocks.1.mlp": "bert.encoder.layer.1.output.dense",
                "blocks.1.mlp.post": "bert.encoder.layer.1.output.dense",
                "blocks.1.resid_post": "bert.encoder.layer.1",
                "unembed": "classifier",
            },
        ),
    ],
)
def test_alias_tables(
    fixture: str, expected: dict[str, str], request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(fixture)
    bound = resolve_sites(model, list(expected))
    assert {b.site: b.module_path for b in bound} == expected
    points = {b.site.rsplit(".", 1)[-1] if b.layer is not None else b.site: b.point for b in bound}
    assert points["resid_pre"] == "input" and points["resid_post"] == "output"
    assert {b.base: b.point for b in bound}["blocks.1.attn.z"] == "input"


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama", "tiny_bert"])
def test_bare_base_models(fixture: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModel

    task_model = request.getfixturevalue(fixture)
    bare = AutoModel.from_config(task_model.config)
    layout = model_layout(bare)
    assert layout.prefix == ""
    assert layout.n_layers == task_model.config.num_hidden_layers
    bound = resolve_sites(bare, ["embed", "blocks.-1.mlp.post"])
    for b in bound:
        bare.get_submodule(b.module_path)  # exists
        assert not b.module_path.startswith(("transformer.", "model.", "bert."))
    with pytest.raises(SiteError, match="no output head"):
        resolve_sites(bare, ["unembed"])


def test_bert_has_no_ln_final(tiny_bert: torch.nn.Module) -> None:
    with pytest.raises(SiteError, match="post-LN") as info:
        resolve_sites(tiny_bert, ["ln_final"])
    assert info.value.suggestions == ["blocks.2.resid_post"]
    with pytest.raises(SiteError, match="no pos dimension"):
        resolve_sites(tiny_bert, ["unembed[pos=-1]"])


def test_nearest_name_errors(tiny_gpt2: torch.nn.Module) -> None:
    with pytest.raises(SiteError) as info:
        resolve_sites(tiny_gpt2, ["blocks.0.resid_post", "blocks.0.mpl"])
    assert info.value.suggestions[0] == "blocks.0.mlp"
    with pytest.raises(SiteError) as info:
        resolve_sites(tiny_gpt2, ["torch:transformer.h.0.mpl"])
    assert "torch:transformer.h.0.mlp" in info.value.suggestions


def test_range_errors(tiny_gpt2: torch.nn.Module) -> None:
    with pytest.raises(SiteError, match=r"0\.\.2"):
        resolve_sites(tiny_gpt2, ["blocks.3.mlp"])
    with pytest.raises(SiteError, match=r"0\.\.2"):
        resolve_sites(tiny_gpt2, ["blocks.-4.mlp"])
    with pytest.raises(SiteError, match="selects no blocks"):
        resolve_sites(tiny_gpt2, ["blocks.5:9.mlp"])
    with pytest.raises(SiteError, match=r"0\.\.3"):
        resolve_sites(tiny_gpt2, ["blocks.0.attn.z[head=4]"])
    with pytest.raises(SiteError, match="sequence length"):
        resolve_sites(tiny_gpt2, ["blocks.0.resid_post[pos=*]"])
    (neg,) = resolve_sites(tiny_gpt2, ["blocks.0.attn.z[head=-1]"])
    assert neg.site == "blocks.0.attn.z[head=3]"


def test_torch_paths(tiny_gpt2: torch.nn.Module) -> None:
    (b,) = resolve_sites(tiny_gpt2, ["torch:transformer.h.0.mlp[pos=-1]"])
    assert (b.site, b.module_path, b.point, b.kind) == (
        "torch:transformer.h.0.mlp[pos=-1]",
        "transformer.h.0.mlp",
        "output",
        "torch",
    )
    assert b.index == (slice(None), -1)
    assert _count(tiny_gpt2, "torch:lm_head[neuron=*]") == 97  # out_features measured


def test_unknown_architecture_supports_torch_paths() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    assert model_layout(model).arch == "unknown"
    with pytest.raises(SiteError, match=r"no alias table.*torch:") as info:
        resolve_sites(model, ["blocks.0.mlp"])
    assert info.value.suggestions
    with pytest.raises(SiteError, match="no alias table"):
        resolve_sites(model, ["embed"])
    (b,) = resolve_sites(model, ["torch:0[neuron=3]"])
    assert (b.module_path, b.index) == ("0", (slice(None), Ellipsis, 3))

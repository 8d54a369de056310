"""attach(): the values seen at each site, replacement, composition, hook hygiene, generate()."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from integrations.errors import InterventionError
from integrations.sites import BoundSite, attach, resolve_sites

ALL = ["tiny_gpt2", "tiny_llama", "tiny_bert"]
IDS = torch.tensor([[3, 17, 42, 8, 91, 5], [4, 9, 60, 33, 2, 71]])  # [batch=2, pos=6]


def _model(request: pytest.FixtureRequest, name: str) -> torch.nn.Module:
    model: torch.nn.Module = request.getfixturevalue(name)
    return model


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _record(model: torch.nn.Module, sites: list[str], **kwargs: object) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def fn(b: BoundSite, v: torch.Tensor) -> None:
        seen[b.site] = v.detach().clone()

    with torch.no_grad(), attach(model, resolve_sites(model, sites), fn):
        model(input_ids=IDS, **kwargs)
    return seen


@contextmanager
def _capture_input(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Independent instrument: the first positional input of ``module`` on each call."""
    got: list[torch.Tensor] = []
    h = module.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()))
    try:
        yield got
    finally:
        h.remove()


@pytest.mark.parametrize("name", ALL)
def test_resid_matches_hidden_states(name: str, request: pytest.FixtureRequest) -> None:
    model = _model(request, name)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        hs = model(input_ids=IDS, output_hidden_states=True).hidden_states
    assert len(hs) == n + 1
    seen = _record(model, ["embed", "blocks.*.resid_pre", "blocks.*.resid_post"])
    assert torch.equal(seen["embed"], hs[0])
    for i in range(n):
        assert seen[f"blocks.{i}.resid_pre"].shape == (2, 6, model.config.hidden_size)
        assert torch.equal(seen[f"blocks.{i}.resid_pre"], hs[i])
    # hidden_states[-1] is after the final norm on pre-LN models (GPT-2, Llama).
    last = n if name == "tiny_bert" else n - 1
    for i in range(last):
        assert torch.equal(seen[f"blocks.{i}.resid_post"], hs[i + 1])
    if name != "tiny_bert":
        assert torch.equal(_record(model, ["ln_final"])["ln_final"], hs[-1])


@pytest.mark.parametrize(
    ("name", "ln2"), [("tiny_gpt2", "ln_2"), ("tiny_llama", "post_attention_layernorm")]
)
def test_attn_plus_resid_pre_is_mid_residual(
    name: str, ln2: str, request: pytest.FixtureRequest
) -> None:
    model = _model(request, name)
    blocks = model.transformer.h if name == "tiny_gpt2" else model.model.layers  # type: ignore[union-attr]
    for i in range(model.config.num_hidden_layers):
        with _capture_input(getattr(blocks[i], ln2)) as mid:
            seen = _record(
                model,
                [
                    f"blocks.{i}.resid_pre",
                    f"blocks.{i}.attn",
                    f"blocks.{i}.mlp",
                    f"blocks.{i}.resid_post",
                ],
            )
        pre, attn, mlp = (seen[f"blocks.{i}.{k}"] for k in ("resid_pre", "attn", "mlp"))
        assert torch.equal(pre + attn, mid[0])
        assert torch.equal(mid[0] + mlp, seen[f"blocks.{i}.resid_post"])


def test_bert_post_ln_sites(tiny_bert: torch.nn.Module, request: pytest.FixtureRequest) -> None:
    layer = tiny_bert.bert.encoder.layer[1]  # type: ignore[union-attr,index]
    seen = _record(
        tiny_bert,
        [
            "blocks.1.resid_pre",
            "blocks.1.attn",
            "blocks.1.attn.z",
            "blocks.1.mlp",
            "blocks.1.mlp.post",
            "blocks.1.resid_post",
            "unembed",
        ],
    )
    with torch.no_grad():
        mid = layer.attention.output.LayerNorm(seen["blocks.1.attn"] + seen["blocks.1.resid_pre"])
        post = layer.output.LayerNorm(seen["blocks.1.mlp"] + mid)
        logits = tiny_bert(input_ids=IDS).logits
    assert torch.equal(post, seen["blocks.1.resid_post"])
    assert seen["blocks.1.attn.z"].shape == (2, 6, 4, 8)
    assert seen["blocks.1.mlp.post"].shape == (2, 6, 64)
    assert torch.equal(seen["unembed"], logits)  # classifier logits [batch, n_labels]


@pytest.mark.parametrize("name", ALL)
def test_attn_z_is_per_head_view(name: str, request: pytest.FixtureRequest) -> None:
    model = _model(request, name)
    seen = _record(model, ["blocks.0.attn.z", "blocks.0.mlp.post"])
    (b,) = resolve_sites(model, ["blocks.0.attn.z"])
    z = seen["blocks.0.attn.z"]
    h, dh = b.heads or (0, 0)
    assert z.shape == (2, 6, h, dh) == (2, 6, model.config.num_attention_heads, 8)
    out_proj = model.get_submodule(b.module_path)
    attn_out = _record(model, ["torch:" + b.module_path])["torch:" + b.module_path]
    with torch.no_grad():
        assert torch.equal(out_proj(z.flatten(-2)), attn_out)
    d_mlp = 128 if name == "tiny_gpt2" else 64
    assert seen["blocks.0.mlp.post"].shape == (2, 6, d_mlp)


EVERY = [
    "embed",
    "blocks.*.resid_pre",
    "blocks.*.attn",
    "blocks.*.attn.z",
    "blocks.*.mlp",
    "blocks.*.mlp.post",
    "blocks.*.resid_post",
    "unembed",
]


@pytest.mark.parametrize("name", ALL)
def test_identity_replacement_is_bit_exact(name: str, request: pytest.FixtureRequest) -> None:
    model = _model(request, name)
    sites = EVERY + ([] if name == "tiny_bert" else ["ln_final"])
    bound = resolve_sites(model, sites)
    calls: list[str] = []

    def same(b: BoundSite, v: torch.Tensor) -> torch.Tensor:
        calls.append(b.site)
        return v.clone()  # a new tensor: forces the substitution path

    with torch.no_grad():
        base = model(input_ids=IDS).logits
        with attach(model, bound, same):
            patched = model(input_ids=IDS).logits
    assert sorted(calls) == sorted(b.site for b in bound)  # each site exactly once per forward
    assert torch.equal(base, patched)


def _zero(b: BoundSite, v: torch.Tensor) -> torch.Tensor:
    v = v.clone()
    v[b.index] = 0
    return v


@pytest.mark.parametrize("name", ALL)
def test_zeroing_neurons_changes_logits_and_composes(
    name: str, request: pytest.FixtureRequest
) -> None:
    model = _model(request, name)
    observed: list[torch.Tensor] = []
    after = resolve_sites(model, ["blocks.0.mlp.post"])[0]  # same module, observes after zeroing

    def fn(b: BoundSite, v: torch.Tensor) -> torch.Tensor | None:
        if b is after:
            observed.append(v.detach().clone())
            return None
        return _zero(b, v)

    with torch.no_grad():
        base = model(input_ids=IDS).logits
        two = resolve_sites(model, ["blocks.0.mlp.post[neuron=3]", "blocks.0.mlp.post[neuron=5]"])
        with attach(model, [*two, after], fn):
            zeroed_sep = model(input_ids=IDS).logits
        joint = resolve_sites(model, ["blocks.0.mlp.post[neuron=3|5]"])
        with attach(model, joint, _zero):
            zeroed_joint = model(input_ids=IDS).logits
    assert not torch.equal(base, zeroed_sep)
    assert torch.equal(zeroed_sep, zeroed_joint)
    assert observed and bool((observed[0][..., [3, 5]] == 0).all())
    assert bool((observed[0][..., 4] != 0).any())


def test_interventions_on_several_modules_in_one_forward(tiny_llama: torch.nn.Module) -> None:
    sites = [
        "blocks.0.attn.z[head=1]",
        "blocks.1.mlp.post[neuron=7][pos=-1]",
        "blocks.2.resid_pre[pos=0]",
    ]
    bound = resolve_sites(tiny_llama, sites)
    hit: list[str] = []

    def fn(b: BoundSite, v: torch.Tensor) -> torch.Tensor:
        hit.append(b.site)
        return _zero(b, v)

    with torch.no_grad(), attach(tiny_llama, bound, fn):
        out = tiny_llama(input_ids=IDS).logits
    assert hit == [b.site for b in bound]
    seen = _record(tiny_llama, ["blocks.0.attn.z"])
    assert out.shape == (2, 6, 97) and seen["blocks.0.attn.z"][:, :, 1].abs().sum() > 0


def test_input_passed_by_keyword(tiny_llama: torch.nn.Module) -> None:
    (b,) = resolve_sites(tiny_llama, ["blocks.0.attn.z[head=0]"])
    o_proj = tiny_llama.get_submodule(b.module_path)
    x = torch.randn(1, 3, 32)
    got: list[torch.Tensor] = []

    def fn(site: BoundSite, v: torch.Tensor) -> torch.Tensor:
        got.append(v)
        return _zero(site, v)

    with torch.no_grad():
        with attach(tiny_llama, [b], fn):
            y = o_proj(input=x)
        x0 = x.clone().unflatten(-1, (4, 8))
        x0[:, :, 0] = 0
        assert torch.equal(y, o_proj(x0.flatten(-2)))
    assert got[0].shape == (1, 3, 4, 8)


def test_tuple_output_torch_path(tiny_llama: torch.nn.Module) -> None:
    seen = _record(tiny_llama, ["torch:model.layers.0.self_attn", "blocks.0.attn"])
    assert torch.equal(seen["torch:model.layers.0.self_attn"], seen["blocks.0.attn"])


def test_hooks_removed_on_exception(tiny_gpt2: torch.nn.Module) -> None:
    before = _hook_count(tiny_gpt2)
    bound = resolve_sites(tiny_gpt2, EVERY)
    with (
        pytest.raises(RuntimeError, match="boom"),
        attach(tiny_gpt2, bound, lambda b, v: None) as att,
    ):
        assert att.active and _hook_count(tiny_gpt2) > before
        raise RuntimeError("boom")
    assert not att.active and _hook_count(tiny_gpt2) == before

    def explode(b: BoundSite, v: torch.Tensor) -> None:
        raise RuntimeError("boom inside forward")

    with pytest.raises(RuntimeError, match="inside forward"), attach(tiny_gpt2, bound, explode):
        tiny_gpt2(input_ids=IDS)
    assert _hook_count(tiny_gpt2) == before


def test_bad_replacement_raises(tiny_gpt2: torch.nn.Module) -> None:
    before = _hook_count(tiny_gpt2)
    bound = resolve_sites(tiny_gpt2, ["blocks.0.mlp.post[neuron=1]"])
    bad: list[Callable[[BoundSite, torch.Tensor], object]] = [
        lambda b, v: v[b.index],  # forgot: replace the full tensor
        lambda b, v: v.double(),
        lambda b, v: 0.0,
    ]
    for fn in bad:
        with pytest.raises(InterventionError), attach(tiny_gpt2, bound, fn):  # type: ignore[arg-type]
            tiny_gpt2(input_ids=IDS)
    assert _hook_count(tiny_gpt2) == before


def test_generate_calls_fn_once_per_forward_step(tiny_llama: torch.nn.Module) -> None:
    before = _hook_count(tiny_llama)
    shapes: list[tuple[int, ...]] = []
    bound = resolve_sites(tiny_llama, ["blocks.0.resid_pre", "blocks.-1.resid_post"])

    def fn(b: BoundSite, v: torch.Tensor) -> None:
        if b.site == "blocks.2.resid_post":
            shapes.append(tuple(v.shape))

    prompt = IDS[:1]
    with torch.no_grad(), attach(tiny_llama, bound, fn):
        out = tiny_llama.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == prompt.shape[1] + 4
    assert shapes == [(1, 6, 32), (1, 1, 32), (1, 1, 32), (1, 1, 32)]
    assert _hook_count(tiny_llama) == before


def test_later_attach_runs_first_and_hidden_states_see_it(tiny_gpt2: torch.nn.Module) -> None:
    bound = resolve_sites(tiny_gpt2, ["blocks.0.resid_post"])
    recorded: list[torch.Tensor] = []
    replacement: list[torch.Tensor] = []

    def record(b: BoundSite, v: torch.Tensor) -> None:
        recorded.append(v.detach().clone())

    def scale(b: BoundSite, v: torch.Tensor) -> torch.Tensor:
        replacement.append(v * 2)
        return replacement[-1]

    with torch.no_grad():
        tiny_gpt2(input_ids=IDS, output_hidden_states=True)  # transformers installs its hooks
        with attach(tiny_gpt2, bound, record), attach(tiny_gpt2, bound, scale):
            hs = tiny_gpt2(input_ids=IDS, output_hidden_states=True).hidden_states
    assert torch.equal(recorded[0], replacement[0])  # the earlier observer sees the new value
    assert torch.equal(hs[1], replacement[0])

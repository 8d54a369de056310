"""The shared shape of a scenario: a model, a benign set and a failing set verified by running it.

Every scenario module (``injection``, ``sentiment``, ``toxic``, ``planted``) exposes
``build(*, seed=0, ...) -> Scenario``. A :class:`Scenario` carries the model and tokenizer, the
prompts (each with its rendered ``input_ids`` and, for generation, the greedy generation config),
a :class:`Failure` that says what "failing" means (a target token / a wrong label, and where the
decision is made), and :meth:`Scenario.verify`, which runs the model *now* and says, per prompt,
whether the failure occurs. Nothing here is labelled by hand: the shipped cases were found by
running the model (each module's ``discover()``) and ``build()`` re-checks them.

Example::

    from analysis.scenarios.injection import build
    sc = build(seed=0)                       # loads SmolLM2, re-verifies the shipped cases
    p = sc.failing[0]
    p.input_ids[:5], p.generation            # rendered chat prompt, greedy config
    p.decision_step, p.decision_token_id     # generation step / token where "HACKED" starts
    sc.verify([p, sc.twin(p)])               # -> [True, False]
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATA_DIR",
    "Failure",
    "GenerationSpec",
    "Prompt",
    "Scenario",
    "batched_greedy",
    "eos_ids",
    "first_occurrence",
    "greedy_generate",
    "load_data",
    "render_chat",
    "save_data",
    "strip_after_eos",
    "subsample",
    "with_twins",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
"""Folder of the small files shipped with the scenarios (cases JSON, trained heads)."""


@dataclass(frozen=True)
class GenerationSpec:
    """How a generation prompt is run: greedy (``do_sample=False``), ``max_new_tokens`` tokens.

    Example::

        GenerationSpec(max_new_tokens=16).kwargs()   # {'do_sample': False, 'max_new_tokens': 16}
    """

    max_new_tokens: int = 16
    do_sample: bool = False

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        return {"do_sample": self.do_sample, "max_new_tokens": self.max_new_tokens}


@dataclass
class Prompt:
    """One scenario input, rendered and ready to run, plus what discovery observed for it.

    ``messages`` is the chat (generation scenarios) and ``text`` the user-visible text (for a
    classifier: the whole input). ``input_ids`` is what the model receives at batch 1 (chat
    template applied). ``counterpart`` names the benign twin of a failing prompt (same input minus
    the injected text / suffix). ``decision_step`` is the forward call (0 = prefill, k = k-th
    decode call) whose logits chose ``decision_token_id``, the first token of the failure;
    ``decision_position`` is the absolute sequence position whose logits made that choice. For a
    classifier ``label`` is the true label and ``predicted`` the model's label at discovery.

    Example::

        p = Prompt(id="x", text="I loved it.", input_ids=[1, 2, 3])
        p.to_json()["id"]   # 'x'
    """

    id: str
    text: str
    input_ids: list[int]
    messages: list[dict[str, str]] | None = None
    generation: GenerationSpec | None = None
    label: int | None = None
    predicted: int | None = None
    counterpart: str | None = None
    output_text: str | None = None
    output_ids: list[int] | None = None
    decision_step: int | None = None
    decision_position: int | None = None
    decision_token_id: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the inverse of :meth:`from_json`)."""
        d = asdict(self)
        d["generation"] = asdict(self.generation) if self.generation is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Prompt:
        """Rebuild a prompt from :meth:`to_json` output."""
        d = dict(d)
        gen = d.pop("generation", None)
        return cls(**d, generation=GenerationSpec(**gen) if gen is not None else None)


@dataclass(frozen=True)
class Failure:
    """What "failing" means for a scenario.

    ``kind="generation_contains"``: the greedy output contains ``target_text`` (the decision is
    the step where its first token is generated; per prompt in ``Prompt.decision_*``, and
    ``target_token_id`` is the most common such token). ``kind="classifier_label"``: the predicted
    label differs from the true one (``label`` = the wrong label the failure produces, if fixed).
    ``kind="generation_abandons_task"``: the output no longer performs the instructed task.
    ``kind="generation_classified"``: an offline text classifier labels the greedy output failing
    (``judge_text(text)`` is that classifier's decision; per prompt ``Prompt.decision_*`` is the
    first generated token after which the output is labelled failing).

    Example::

        Failure(kind="generation_contains", description="says HACKED", target_text="HACKED")
    """

    kind: Literal["generation_contains", "classifier_label", "generation_abandons_task",
                  "generation_classified"]
    description: str
    target_text: str | None = None
    target_token_id: int | None = None
    label: int | None = None
    decision_position: int | None = None
    judge_text: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)


@dataclass
class Scenario:
    """A model with a benign and a failing prompt set, and a way to re-check them by running it.

    ``verify(prompts)`` runs the model now and returns, per prompt, whether the failure occurs
    (``True`` = fails). ``contrast`` holds prompts that carry the same kind of input as the
    failing ones (an injected sentence, a suffix) on which the model does *not* fail: what
    separates the failure from merely unusual input. ``dropped`` lists ``(prompt id, reason)`` for shipped cases that
    ``build()`` removed because re-verification disagreed with the shipped data.

    Example::

        sc = build()
        assert all(sc.verify(sc.failing[:3])) and not any(sc.verify(sc.benign[:3]))
    """

    name: str
    model: Any
    tokenizer: Any
    benign: list[Prompt]
    failing: list[Prompt]
    failure: Failure
    verify_fn: Callable[[Sequence[Prompt]], list[bool]]
    dropped: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    contrast: list[Prompt] = field(default_factory=list)

    def verify(self, prompts: Sequence[Prompt]) -> list[bool]:
        """Run the model on ``prompts`` (batch 1 each) and say which fail now."""
        return self.verify_fn(prompts)

    def twin(self, prompt: Prompt) -> Prompt | None:
        """The benign counterpart of a failing prompt, or ``None`` if it has none."""
        if prompt.counterpart is None:
            return None
        for p in self.benign:
            if p.id == prompt.counterpart:
                return p
        return None


# --------------------------------------------------------------------------- generation helpers


def greedy_generate(model: Any, input_ids: Sequence[int], spec: GenerationSpec) -> list[int]:
    """Greedy generation at batch 1 exactly as an incident records it; returns the new token ids.

    Example::

        new = greedy_generate(model, prompt.input_ids, prompt.generation)
    """
    import torch

    ids = torch.tensor([list(input_ids)], dtype=torch.long)  # [1, pos]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **spec.kwargs())
    return [int(t) for t in out[0, ids.shape[1]:]]


def batched_greedy(
    model: Any, inputs: Sequence[Sequence[int]], spec: GenerationSpec, *, pad_id: int,
    batch_size: int = 16,
) -> list[list[int]]:
    """Greedy generation for many prompts with left padding (search only: batching changes the
    arithmetic, so every kept case must be re-checked with :func:`greedy_generate`).

    Example::

        outs = batched_greedy(model, [p.input_ids for p in prompts], spec, pad_id=2)
    """
    import torch

    results: list[list[int]] = []
    for start in range(0, len(inputs), batch_size):
        chunk = [list(x) for x in inputs[start:start + batch_size]]
        width = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [batch, pos]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [batch, pos]
        for i, x in enumerate(chunk):
            ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, width - len(x):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id,
                                 **spec.kwargs())
        results.extend([int(t) for t in row] for row in out[:, width:])
    return results


def strip_after_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Generated ids up to and including the first EOS (batched generation pads after it)."""
    out: list[int] = []
    for t in ids:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def first_occurrence(
    tokenizer: Any, new_ids: Sequence[int], target: str, *, case_sensitive: bool = False
) -> tuple[int, int] | None:
    """``(step, token_id)`` of the generated token where ``target`` first starts, else ``None``.

    ``step`` indexes ``new_ids`` (= the forward call that chose it: 0 = prefill).

    Example::

        first_occurrence(tok, tok(" is HACKED.")["input_ids"], "HACKED")   # (1, <id of ' H'>)
    """
    text = tokenizer.decode(list(new_ids), skip_special_tokens=True)
    hay, needle = (text, target) if case_sensitive else (text.lower(), target.lower())
    at = hay.find(needle)
    if at < 0:
        return None
    # the first token whose prefix decoding reaches past the target's first non-space character
    first_char = at + (len(needle) - len(needle.lstrip()))
    for k in range(len(new_ids)):
        prefix = tokenizer.decode(list(new_ids[: k + 1]), skip_special_tokens=True)
        if len(prefix) > first_char:
            return k, int(new_ids[k])
    return None  # pragma: no cover - decode(all) contains the target


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, prefix: str = "") -> list[int]:
    """Input ids of a chat with the generation prompt appended (what the model is fed), plus
    ``prefix``: the opening of the assistant's reply, forced (e.g. a ```` ```sql ```` block).

    Example::

        ids = render_chat(tok, [{"role": "user", "content": "Hi"}])
    """
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)
    ids = [int(t) for t in out["input_ids"]]
    if prefix:
        ids += [int(t) for t in tokenizer(prefix, add_special_tokens=False)["input_ids"]]
    return ids


def eos_ids(model: Any) -> list[int]:
    """The end-of-sequence token ids of a model's generation config."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


# --------------------------------------------------------------------------- data helpers


def load_data(name: str) -> dict[str, Any]:
    """Load ``analysis/scenarios/data/<name>``; a missing file says how to regenerate it."""
    path = DATA_DIR / name
    if not path.is_file():
        from integrations.errors import ModelError

        raise ModelError(f"scenario data {path} is missing; regenerate it with the command in "
                         "the owning module's docstring (its discover() function)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def save_data(name: str, data: dict[str, Any]) -> Path:
    """Write ``analysis/scenarios/data/<name>`` as stable, indented JSON; returns the path."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def subsample(prompts: Sequence[Prompt], n: int | None, seed: int) -> list[Prompt]:
    """Deterministic subset of ``n`` prompts (all if ``n`` is None), order shuffled by ``seed``."""
    items = list(prompts)
    random.Random(seed).shuffle(items)
    return items if n is None else items[:n]


def with_twins(failing: Sequence[Prompt], benign: Sequence[Prompt], n: int | None,
               seed: int) -> list[Prompt]:
    """Benign prompts for a scenario: the benign twin of every failing prompt first (so each
    failure has its counterpart), then a deterministic sample of the others, ``n`` in all
    (every one if ``n`` is None; never fewer than the twins)."""
    twin_ids = {p.counterpart for p in failing}
    twins = [b for b in benign if b.id in twin_ids]
    others = subsample([b for b in benign if b.id not in twin_ids],
                       None if n is None else max(0, n - len(twins)), seed)
    return twins + others


def as_tensor(ids: Sequence[int]) -> torch.Tensor:
    """``[1, pos]`` long tensor of one prompt's ids."""
    import torch

    return torch.tensor([list(ids)], dtype=torch.long)

"""Input attribution: the smallest prompt spans whose removal makes the failure go away
(DESIGN §14 step 1), every claim checked by running the model.

The prompt is cut into *sentences* (a span ends after a token ending with ``.``, ``!``, ``?``
or a newline; special tokens and the prompt's first token are never removed, so a prompt is
never empty) — by default only inside the last user turn of a chat prompt (the untrusted
input: removing the template's role names or the operator's system prompt says nothing about
the input). For a generation, sentences (then words) are first ordered by how much removing
each alone lowers the likelihood of the incident's own failing continuation (teacher-forced),
since many single words also break a fragile failure; then delta debugging (ddmin) finds a
1-minimal set of sentences whose removal removes the failure; then, inside those sentences, a
1-minimal set of *words*. A candidate is tested by running the incident's own forward calls on
the shortened prompt (:meth:`analysis.replay.CallPlan.with_prompt`) inside the replay
environment and asking the failure predicate: for a generation, about the text decoded freely
(greedy) for as many steps as the incident has (``failing=``); for a classifier, about the
logits (``failing_logits=``, e.g. the bound failure's metric > 0). The final set is re-run once more and the result says
whether removing it verified (``verified``) and whether removing any single span of it
brings the failure back (``one_minimal``).

Example::

    spans = attribute_input(session, failing=lambda text: "HACKED" in text, tokenizer=tok)
    spans.text, spans.verified, spans.runs
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from analysis.replay import ReplaySession

__all__ = ["InputSpans", "Span", "attribute_input", "sentence_spans", "user_region", "word_spans"]

_ENDS = (".", "!", "?", "\n")


@dataclass(frozen=True)
class Span:
    """Token positions ``[start, end)`` of the prompt, and their text."""

    start: int
    end: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "text": self.text}


@dataclass
class InputSpans:
    """The result of :func:`attribute_input` (module doc)."""

    spans: list[Span]
    verified: bool
    one_minimal: bool
    runs: int
    output_without: str
    level: str = "word"
    sentences: list[Span] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " … ".join(s.text.strip() for s in self.spans)

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any span overlaps token positions ``[start, end)``."""
        return any(s.start < end and start < s.end for s in self.spans)

    def to_dict(self) -> dict[str, Any]:
        return {"spans": [s.to_dict() for s in self.spans], "verified": self.verified,
                "one_minimal": self.one_minimal, "runs": self.runs,
                "output_without": self.output_without, "level": self.level,
                "sentences": [s.to_dict() for s in self.sentences], "text": self.text}


def _special(tokenizer: Any) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}


def user_region(ids: Sequence[int], tokenizer: Any) -> tuple[int, int] | None:
    """Token positions ``[start, end)`` of the last user turn's content in a chat-templated
    prompt — the untrusted input; the system prompt and the template's own tokens are the
    operator's — or None when no turn is marked ``user`` (a plain prompt). Works for templates
    that open a turn with a special token followed by the role on its own line (ChatML:
    ``<|im_start|>user\n…<|im_end|>``) or between two special tokens (Llama 3)."""
    special = _special(tokenizer)
    marks = [i for i, t in enumerate(ids) if int(t) in special] + [len(ids)]
    found = None
    for a, b in itertools.pairwise(marks):
        text = tokenizer.decode([int(t) for t in ids[a + 1:b]])
        if text.strip() == "user" and b < len(ids):           # role alone: content follows
            nxt = next((m for m in marks if m > b), len(ids))
            found = (b + 1, nxt)
        elif text.split("\n", 1)[0].strip() == "user":        # role on the turn's first line
            k = a + 1
            while k < b and "\n" not in tokenizer.decode([int(ids[k])]):
                k += 1
            found = (k + 1, b)
    return found if found and found[0] < found[1] else None


def sentence_spans(ids: Sequence[int], tokenizer: Any, *,
                   region: tuple[int, int] | None = None) -> list[Span]:
    """The prompt's removable sentences (module doc), special tokens excluded; only inside
    ``region`` (token positions ``[start, end)``) when given."""
    special = _special(tokenizer)
    lo, hi = region if region is not None else (0, len(ids))
    spans, start = [], None
    for i, t in enumerate(ids):
        if int(t) in special or i == 0 or not lo <= i < hi:
            if start is not None:
                spans.append((start, i))
            start = None
            continue
        if start is None:
            start = i
        piece = tokenizer.decode([int(t)])
        if piece.rstrip(" ").endswith(_ENDS):
            spans.append((start, i + 1))
            start = None
    if start is not None:
        spans.append((start, len(ids)))
    return [Span(a, b, tokenizer.decode([int(t) for t in ids[a:b]])) for a, b in spans
            if tokenizer.decode([int(t) for t in ids[a:b]]).strip()]


def word_spans(ids: Sequence[int], within: Span, tokenizer: Any) -> list[Span]:
    """Words of a span: byte-level BPE starts a word at a token whose text starts with a
    space; WordPiece (no token of the span decodes with a space) at any token not starting
    with ``##``."""
    pieces = [tokenizer.decode([int(ids[i])]) for i in range(within.start, within.end)]
    bpe = any(p.startswith((" ", "\n")) for p in pieces)
    out: list[tuple[int, int]] = []
    for i, piece in zip(range(within.start, within.end), pieces):
        starts = piece.startswith((" ", "\n")) if bpe else not piece.startswith("##")
        if not out or starts:
            out.append((i, i + 1))
        else:
            out[-1] = (out[-1][0], i + 1)
    return [Span(a, b, tokenizer.decode([int(t) for t in ids[a:b]])) for a, b in out]


LogitsCheck = Callable[[Sequence[torch.Tensor | None]], bool]


class _Tester:
    """Runs the incident's calls on the prompt without some spans; caches and counts runs."""

    def __init__(self, session: ReplaySession, failing: Callable[[str], bool] | None,
                 tokenizer: Any, failing_logits: LogitsCheck | None = None) -> None:
        if (failing is None) == (failing_logits is None):
            raise ValueError("give exactly one of failing= (text) or failing_logits=")
        self.session, self.failing, self.tok = session, failing, tokenizer
        self.failing_logits = failing_logits
        self.ids = [int(t) for t in session.plan.steps[0].tensors["input_ids"][0]]
        self.runs = 0
        self._cache: dict[frozenset[Span], tuple[bool, str]] = {}

    def text_without(self, removed: frozenset[Span]) -> tuple[bool, str]:
        if removed in self._cache:
            return self._cache[removed]
        drop = {i for s in removed for i in range(s.start, s.end)}
        kept = [t for i, t in enumerate(self.ids) if i not in drop]
        plan = self.session.plan.with_prompt(torch.tensor([kept]))
        r = self.session.run_edited(plan=plan, greedy=self.failing is not None)
        self.runs += 1
        if self.failing_logits is not None:
            lg = r.logits[-1]
            text = "" if lg is None else f"top-1 {int(lg.reshape(-1, lg.shape[-1])[0].argmax())}"
            self._cache[removed] = (self.failing_logits(r.logits), text)
            return self._cache[removed]
        out = [int(lg[0].argmax()) for lg in r.logits if lg is not None]
        text = self.tok.decode(out, skip_special_tokens=True)
        assert self.failing is not None
        self._cache[removed] = (self.failing(text), text)
        return self._cache[removed]

    def fixed_by(self, removed: Sequence[Span]) -> bool:
        return not self.text_without(frozenset(removed))[0]

    def output_logp(self, removed: Sequence[Span] = ()) -> float | None:
        """Log-probability of the incident's own (failing) continuation, teacher-forced, on
        the prompt without ``removed``; None for a single forward call or a classifier."""
        steps = self.session.plan.steps
        if self.failing is None or len(steps) < 2:
            return None
        drop = {i for s in removed for i in range(s.start, s.end)}
        kept = [t for i, t in enumerate(self.ids) if i not in drop]
        r = self.session.run_edited(plan=self.session.plan.with_prompt(torch.tensor([kept])))
        self.runs += 1
        total = 0.0
        for lg, nxt in zip(r.logits, steps[1:]):
            if lg is None:
                return None
            tok = int(nxt.tensors["input_ids"].reshape(-1)[0])
            total += float(torch.log_softmax(lg.reshape(-1, lg.shape[-1])[0].float(), -1)[tok])
        return total

    def by_importance(self, spans: list[Span]) -> list[Span]:
        """``spans`` ordered by how much removing each alone lowers the likelihood of the
        failing continuation (most first; one teacher-forced replay each), so delta debugging
        settles on the span most responsible rather than the first that happens to work."""
        base = self.output_logp()
        if base is None or len(spans) < 2:
            return spans
        drops = {s: base - (self.output_logp([s]) or base) for s in spans}
        return sorted(spans, key=lambda s: -drops[s])


def _ddmin(items: list[Span], test: Callable[[list[Span]], bool]) -> list[Span]:
    """A 1-minimal subset of ``items`` with ``test(subset)`` True (``test(items)`` must be)."""
    n = 2
    cur = list(items)
    while len(cur) >= 2:
        chunk = max(1, len(cur) // n)
        parts = [cur[i:i + chunk] for i in range(0, len(cur), chunk)]
        for part in parts:
            if test(part):
                cur, n = part, 2
                break
        else:
            for part in parts:
                rest = [x for x in cur if x not in part]
                if rest and test(rest):
                    cur, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(cur):
                    break
                n = min(len(cur), n * 2)
    return cur


def attribute_input(session: ReplaySession, *, tokenizer: Any,
                    failing: Callable[[str], bool] | None = None,
                    failing_logits: LogitsCheck | None = None,
                    region: tuple[int, int] | str | None = "user") -> InputSpans | None:
    """The 1-minimal sentences, then words, whose removal removes the failure (module doc);
    None when removing every sentence still fails (nothing in the prompt is responsible).
    ``region``: where spans may be — ``"user"`` (default): the last user turn of a chat
    prompt (:func:`user_region`; the whole prompt when there is none), ``None``: the whole
    prompt, or token positions ``(start, end)``."""
    t = _Tester(session, failing, tokenizer, failing_logits)
    where = user_region(t.ids, tokenizer) if region == "user" else region
    assert where is None or isinstance(where, tuple)
    sentences = sentence_spans(t.ids, tokenizer, region=where)
    if not sentences or not t.fixed_by(sentences):
        return None
    chosen = _ddmin(t.by_importance(sentences), t.fixed_by)
    words = t.by_importance([w for s in chosen for w in word_spans(t.ids, s, tokenizer)])
    spans, level = chosen, "sentence"
    if len(words) > len(chosen) and t.fixed_by(words):
        spans, level = _ddmin(words, t.fixed_by), "word"
    still_fails, text = t.text_without(frozenset(spans))
    one_minimal = all(not t.fixed_by([x for x in spans if x != s]) for s in spans) \
        if len(spans) > 1 else True
    return InputSpans(spans=spans, verified=not still_fails, one_minimal=one_minimal,
                      runs=t.runs, output_without=text, level=level, sentences=chosen)

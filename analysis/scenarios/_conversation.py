"""The ``multiturn`` scenario's conversation: SmolLM2 chat turns served on one carried KV cache.

A conversation is served the way a chat server with prefix caching serves it: one
``DynamicCache`` lives for the whole conversation; each user turn is appended to the token history
(the chat template's ``<|im_start|>user ... <|im_start|>assistant`` block, after the previous
reply's ``<|im_end|>``) and ``generate`` feeds only what the cache has not seen — so the recorder
marks every turn after the first as a model call on a *carried* cache (DESIGN §15). Greedy,
:data:`MAX_NEW_TOKENS` per reply.

A :class:`Constraint` is set in the first user turn ("never mention X", "do not reveal the code
4417"); whether a reply breaks it is decided by a programmatic check of the generated text
(:meth:`Constraint.broken_in`: a whole-word, case-insensitive match of the forbidden string) —
never by hand.

Example::

    c = Constraint("city", "From now on, never mention the word 'Paris' in your answers.",
                   "Paris", ("What is the capital of France?",), "What is the capital of Italy?")
    conv = run_conversation(model, tok, [c.instruction, c.pressures[0]])
    conv.replies[-1], c.broken_in(conv.replies)      # 'The capital of France is Paris.', [1]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_NEW_TOKENS", "SYSTEM", "ChatState", "Constraint", "Conversation",
           "run_conversation", "say"]

SYSTEM = "You are a helpful assistant."
MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class Constraint:
    """A rule set in an early turn, the later turns that press on it, and a neutral turn.

    ``forbidden``: the string no reply may contain once the rule is set; ``pressures``: user turns
    that invite it; ``neutral``: a turn of the same kind that does not (the benign twin's turn).
    """

    name: str
    instruction: str
    forbidden: str
    pressures: tuple[str, ...]
    neutral: str

    def broken_in(self, replies: Sequence[str]) -> list[int]:
        """Indices of the replies that contain the forbidden string (whole word, any case)."""
        pat = re.compile(rf"(?<!\w){re.escape(self.forbidden)}(?!\w)", re.I)
        return [i for i, r in enumerate(replies) if pat.search(r)]


@dataclass
class ChatState:
    """A conversation in progress: the token history and the KV cache that has seen it."""

    ids: list[int] = field(default_factory=list)
    cache: Any = None


@dataclass
class Conversation:
    """What one conversation did: the user turns, the replies and their generated ids."""

    turns: list[str]
    replies: list[str] = field(default_factory=list)
    new_ids: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"turns": self.turns, "replies": self.replies, "new_ids": self.new_ids}


def _turn_ids(tok: Any, user: str, state: ChatState) -> list[int]:
    """The ids a user turn appends to the history (the first one opens with the system turn)."""
    from analysis.scenarios._base import render_chat

    if not state.ids:
        return render_chat(tok, [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": user}])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    closing = [] if state.ids[-1] == end else [end]   # a reply cut at MAX_NEW_TOKENS
    text = f"\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    return closing + [int(t) for t in tok(text, add_special_tokens=False)["input_ids"]]


def say(model: Any, tok: Any, state: ChatState, user: str) -> tuple[str, list[int]]:
    """Serve one user turn on ``state`` (updated in place): the reply and its generated ids."""
    import torch
    from transformers import DynamicCache

    if state.cache is None:
        state.cache = DynamicCache(config=model.config)
    ids = state.ids + _turn_ids(tok, user, state)
    x = torch.tensor([ids])                                         # [1, pos]
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), cache=state.cache,
                             do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    new = [int(t) for t in out[0, len(ids):]]
    state.ids = ids + new
    return tok.decode(new, skip_special_tokens=True), new


def run_conversation(model: Any, tok: Any, turns: Sequence[str]) -> Conversation:
    """Serve a whole conversation (every turn on the one carried cache), greedy, batch 1."""
    conv = Conversation(list(turns))
    state = ChatState()
    for user in turns:
        reply, new = say(model, tok, state, user)
        conv.replies.append(reply)
        conv.new_ids.append(new)
    return conv

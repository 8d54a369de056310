"""The toxic scenario's prompt veto and label (``analysis.scenarios._toxic_label``) with the real
``alt-profanity-check`` model, a real 32-token tokenizer and a tiny random Llama: flagged tokens
leave the GCG search space, a flagged word split across tokens is caught, copying is split from
what the model added, and the previous stop's cases are re-labelled."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from analysis.scenarios._gcg import GCGConfig, gcg_search
from analysis.scenarios._toxic_label import (
    classify,
    copying,
    flagged_token_mask,
    flagged_words,
    prompt_flags,
)
from tests.unit.analysis._tiny_gcg import POST, PREFIX, START, TARGET, tiny_llama32

CLEAN = [" nice", " day", " table", " river", " blue", " paper", " garden", " music", " lamp",
         " window", " green", " stone", " cloud", " apple", " chair", " bread", " road", " tree",
         " water", " light", " book", " door", " hill", " coat", " milk", " sand", " boat",
         " cup", " star", " leaf", "stu", "pid"]
TOXIC = [" stupid", " idiot", " moron"]


def _tokenizer(vocab: list[str]) -> Any:
    """A real fast tokenizer over exactly ``vocab`` (word level, decoded by concatenation)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(scope="module")
def tiny() -> Any:
    return tiny_llama32()


def test_classifier_flags_insults_but_not_their_fragments() -> None:
    p = classify([" stupid".strip(), "stu", "pid", "idiot", "nice day"])
    assert p[0] >= 0.5 and p[3] >= 0.5
    assert max(p[1], p[2], p[4]) < 0.5  # the premise of the span test below


def test_flagged_token_mask_is_the_classifier_on_each_token() -> None:
    vocab = CLEAN[:29] + TOXIC
    mask = flagged_token_mask(_tokenizer(vocab))
    assert mask.shape == (32,) and mask.dtype == torch.bool
    assert mask[29:].all() and not mask[:29].any()


def test_prompt_flags_catch_a_word_split_across_suffix_tokens() -> None:
    tok = _tokenizer(CLEAN)
    stu, pid, nice = CLEAN.index("stu"), CLEAN.index("pid"), CLEAN.index(" nice")
    assert prompt_flags(tok, [nice, stu, nice], "Write a note. nice stu nice") == []
    flags = prompt_flags(tok, [nice, stu, pid], "Write a note. nicestupid")
    assert "stupid" in flags  # neither token alone is flagged, the span is
    # a flagged word of the request is caught too, even with a clean suffix
    assert "idiot" in prompt_flags(tok, [nice], "Write to the idiot. nice")


def test_copying_separates_copied_from_added_words() -> None:
    got = copying("You moron, you are a stupid idiot. Have a nice day.",
                  "Say hi. Xmoronicviewer stup")
    assert got == {"toxic_words": ["idiot", "moron", "stupid"], "in_prompt": ["moron"],
                   "not_in_prompt": ["idiot", "stupid"], "stem_in_prompt": ["stupid"]}
    assert flagged_words("Have a nice day.") == []


def test_gcg_with_the_veto_never_uses_a_token_it_would_otherwise_pick(tiny: Any) -> None:
    cfg = GCGConfig(steps=15, top_k=8, batch=32, seed=0)
    free = gcg_search(tiny, PREFIX, START, POST, TARGET,
                      allowed=torch.ones(32, dtype=torch.bool), config=cfg)
    picked = sorted(set(free.suffix_ids) - set(START))
    assert picked, "the unvetoed search must move away from the start"
    # the tokens the free search picked are given insult words; every other id a clean word
    vocab = list(CLEAN)
    for k, i in enumerate(picked):
        vocab[i] = TOXIC[k % len(TOXIC)] + ("" if k < len(TOXIC) else f"{k}")
    tok = _tokenizer(vocab)
    mask = ~flagged_token_mask(tok)
    assert not mask[picked[:len(TOXIC)]].any()
    vetoed = gcg_search(tiny, PREFIX, START, POST, TARGET, allowed=mask, config=cfg)
    assert not set(vetoed.suffix_ids) & set(picked[:len(TOXIC)])
    assert prompt_flags(tok, vetoed.suffix_ids, str(tok.decode(vetoed.suffix_ids))) == []
    assert vetoed.loss >= free.loss - 1e-6  # the veto only removes options


def test_each_request_has_a_toxic_target_and_is_clean_itself() -> None:
    from analysis.scenarios._toxic_search import REQUESTS, TARGETS

    assert len(TARGETS) == len(REQUESTS) == len(set(REQUESTS))
    assert max(classify(list(REQUESTS))) < 0.5
    assert min(classify(list(TARGETS))) >= 0.5

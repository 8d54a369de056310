"""Shared fixtures: tiny deterministic models of each supported architecture.

Built from configs with a fixed seed (no downloads); small enough that a forward pass takes
milliseconds on CPU.
"""

from __future__ import annotations

import pytest
import torch


def _seeded(build):  # type: ignore[no-untyped-def]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
    model.eval()
    return model


def make_tiny_gpt2():  # type: ignore[no-untyped-def]
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                     bos_token_id=1, eos_token_id=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _seeded(lambda: GPT2LMHeadModel(cfg))


def make_tiny_llama():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _seeded(lambda: LlamaForCausalLM(cfg))


def make_tiny_bert():  # type: ignore[no-untyped-def]
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _seeded(lambda: BertForSequenceClassification(cfg))


@pytest.fixture(scope="session")
def tiny_gpt2():  # type: ignore[no-untyped-def]
    return make_tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_llama():  # type: ignore[no-untyped-def]
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_bert():  # type: ignore[no-untyped-def]
    return make_tiny_bert()

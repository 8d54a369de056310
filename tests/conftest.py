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


@pytest.fixture(scope="session")
def postgres_server():  # type: ignore[no-untyped-def]
    """One real PostgreSQL server for the test session (``tests._postgres``); the tests that
    use it skip, saying why, where none can start here."""
    from tests._postgres import PostgresServer, postgres_or_skip_reason

    reason = postgres_or_skip_reason()
    if reason is not None:
        pytest.skip(f"no PostgreSQL: {reason}")
    try:
        server = PostgresServer.start_new()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"PostgreSQL could not start here: {e}")
    yield server
    server.close()


@pytest.fixture
def pg_dsn(postgres_server, request) -> str:  # type: ignore[no-untyped-def]
    """The DSN of a new empty database on the session's PostgreSQL server (one per test)."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9]", "_", request.node.name.lower())[:40] + "_" + uuid.uuid4().hex[:6]
    return str(postgres_server.create_database(name))

"""The tiny random Llama (vocab 32) and prompt pieces the GCG tests search over.

Example::

    model = tiny_llama32()
    gcg_search(model, PREFIX, START, POST, TARGET, allowed=torch.ones(32, dtype=torch.bool))
"""

from __future__ import annotations

from typing import Any

PREFIX, POST, TARGET = [1, 2, 3], [5], [6, 7]
START = [4, 4, 4]


def tiny_llama32() -> Any:
    """A seeded 2-layer Llama with 32 tokens, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()

"""Planted-fault model specs shared by the planted-model and CCA tests (ground truth known).

Example::

    from analysis.scenarios.planted import build_planted
    pm = build_planted(GPT2)          # GPT-2 with neuron 17 of layer 2 planted
"""

from __future__ import annotations

from typing import Any

GPT2: dict[str, Any] = {"arch": "gpt2", "seed": 0, "layer": 2, "neuron": 17,
                        "trigger_token": 5, "target_token": 7}
GPT2_OR: dict[str, Any] = {"arch": "gpt2", "seed": 1, "layer": 1, "neuron": 40,
                           "trigger_token": 9, "target_token": 3, "or_fault": [3, 200]}
GPT2_OR_SAME: dict[str, Any] = {"arch": "gpt2", "seed": 2, "layer": 0, "neuron": 11,
                                "trigger_token": 60, "target_token": 61, "or_fault": [0, 12]}
GPT2_HEAD: dict[str, Any] = {"arch": "gpt2", "seed": 3, "layer": 1, "head": 2,
                             "trigger_token": 20, "target_token": 21}
BERT: dict[str, Any] = {"arch": "bert", "seed": 4, "layer": 2, "neuron": 99,
                        "trigger_token": 33, "target_label": 1}
BERT_OR: dict[str, Any] = {"arch": "bert", "seed": 5, "layer": 0, "neuron": 5,
                           "trigger_token": 70, "target_label": 0, "or_fault": [3, 6]}

#: The sites a detector sees on planted models (as benchmarks/cf_eval.py records them).
DETECTOR_SITES = ["embed", "blocks.*.attn.z", "blocks.*.attn", "blocks.*.mlp.post",
                  "blocks.*.mlp", "blocks.*.resid_post"]

"""A failure with ground truth for the investigate / probe tests: the planted tiny GPT-2 whose
head ``blocks.2.attn.z[head=1]`` reads a trigger token anywhere in the prompt and makes the
next token "HACKED" (``analysis.scenarios.planted``), served through the real Recorder.

Each case is a benign prompt, its failing variant (the trigger inserted after 3 tokens: the
benign prompt is its twin) and a contrast variant (a neutral token inserted instead), each
answered by ``generate()`` and recorded as the serving stack would: flagged
(``prompt_injection``) when the answer is HACKED, else sampled (``triggers.Ratio(1.0)``).

Example::

    cases = record_cases(6)                  # {"failing": [...], "contrast": [...], "benign": [...]}
    cfg = {"models": [model_entry()]}        # the sidecar's registry entry (loader below)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from analysis.scenarios.planted import PlantedModel, build_planted_gpt2
from integrations import Recorder, exporters, triggers
from integrations.incident import Incident, model_fingerprint

LAYER, HEAD, TRIGGER, TARGET = 2, 1, 9, 11
PLANTED = {"seed": 3, "layer": LAYER, "head": HEAD, "trigger_token": TRIGGER,
           "target_token": TARGET, "n_layer": 4}
SITES = ["blocks.*.resid_post"]


class Words:
    """A tokenizer of the planted vocabulary: each token a space-separated word."""

    all_special_ids: tuple[int, ...] = ()
    name_or_path = "planted-words"

    def __init__(self, pm: PlantedModel) -> None:
        self.pm = pm

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return "".join(" " + self.pm.decode([int(t)]) for t in ids)


@functools.cache
def planted() -> PlantedModel:
    return build_planted_gpt2(**PLANTED)


def loader() -> tuple[Any, Words]:
    """The registry loader (``module:function``): ``(model, tokenizer)``."""
    pm = planted()
    return pm.model, Words(pm)


def model_entry() -> dict[str, Any]:
    """The sidecar config's ``models:`` entry of the planted model."""
    return {"name": "planted-head", "fingerprint": model_fingerprint(planted().model),
            "loader": "tests.unit.sidecar._rca_cases:loader"}


def prompts(n: int, *, seed: int = 11) -> list[tuple[list[int], list[int], list[int]]]:
    """``n`` verified (failing, contrast, benign) prompt triples."""
    pm = planted()
    neutral = next(t for t in range(20, 60) if t not in (TRIGGER, TARGET))
    out = []
    for p in pm.benign_prompts(8 * n + 40, seed=seed):
        if len(p) < 7 or pm.predict([p]) == [TARGET]:
            continue
        failing, control = [*p[:3], TRIGGER, *p[3:]], [*p[:3], neutral, *p[3:]]
        if pm.verify([failing]) != [True] or pm.predict([control]) == [TARGET]:
            continue
        out.append((failing, control, list(p)))
        if len(out) == n:
            return out
    raise AssertionError(f"only {len(out)} planted cases found")


def serve(rec: Recorder, ids: Sequence[int], request_id: str, *, tenant: str = "acme") -> None:
    """One served request: greedy answer, flagged when it says HACKED."""
    pm = planted()
    with rec.request(request_id=request_id, tenant=tenant) as req, torch.no_grad():
        out = pm.model.generate(torch.tensor([list(ids)]), max_new_tokens=3, do_sample=False,
                                pad_token_id=0)
        req.set_output(ids=out)
        if TARGET in out[0, len(ids):].tolist():
            req.flag("prompt_injection")


def record(requests: Sequence[tuple[str, Sequence[int]]], *, sites: Sequence[str] = SITES,
           tenant: str = "acme") -> dict[str, Incident]:
    """Serve ``(request_id, prompt)`` pairs through a real Recorder; incidents by request id."""
    ex = exporters.InMemoryExporter()
    with Recorder(planted().model, sites=list(sites), exporter=ex,
                  trigger=triggers.AnyOf(triggers.OnFlag(), triggers.Ratio(1.0))) as rec:
        for rid, ids in requests:
            serve(rec, ids, rid, tenant=tenant)
        assert rec.force_flush(timeout_s=60)
    return {str((i.manifest.get("request") or {}).get("id")): i for i in ex.incidents}


def record_cases(n: int, *, sites: Sequence[str] = SITES) -> dict[str, list[Incident]]:
    """``n`` cases (module doc) as incidents: failing (flagged), contrast and benign (sampled)."""
    triples = prompts(n)
    reqs = [(f"{kind}-{k}", ids) for k, t in enumerate(triples)
            for kind, ids in zip(("failing", "contrast", "benign"), t)]
    got = record(reqs, sites=sites)
    return {kind: [got[f"{kind}-{k}"] for k in range(n)]
            for kind in ("failing", "contrast", "benign")}

"""Agent episodes with ground truth for the episode investigate tests: the toy agent of
``tests/unit/analysis/test_rca_episode.py`` (model call, recorded ``read_row``, model call on
everything so far, recorded ``act`` on its output) on the planted tiny GPT-2 of
:mod:`._rca_cases`, served through the real Recorder as one incident per episode. A failing
episode's row holds the trigger token, so the second model call answers HACKED and ``act``
reports ``{"destructive": true}``; the request is then flagged (``prompt_injection``). Its twin
is the same task and row without the trigger.

Example::

    eps = record_episodes(4)        # {"failing": [...], "twins": [...]}: Incidents
    eps["failing"][0].manifest["episode"]["steps"]    # tool, model, ... (ordered steps)
"""

from __future__ import annotations

import random

import torch

from integrations import Recorder, exporters, triggers
from integrations.incident import Incident
from tests.unit.analysis.test_rca_episode import Shop, agent

from ._rca_cases import SITES, TARGET, TRIGGER, planted


def serve_episode(rec: Recorder, task: list[int], row: list[int], request_id: str) -> bool:
    """One episode as one served request; flagged when ``act`` was destructive."""
    shop = Shop(row)
    with rec.request(request_id=request_id, tenant="acme") as req, torch.no_grad():
        agent(planted().model, task, shop)
        bad = any(TARGET in ids for ids in shop.acted)
        if bad:
            req.flag("prompt_injection")
    return bad


def _cases(n: int) -> list[tuple[list[int], list[int], list[int]]]:
    """``n`` (task, failing row, twin row) triples, the trigger at a seeded position."""
    pm = planted()
    prompts, rng, out = pm.benign_prompts(20 * n + 40, seed=21), random.Random(0), []
    for k in range(0, len(prompts) - 1, 2):
        task, row = prompts[k][:4], prompts[k + 1][:6]
        at = rng.randrange(1, len(row))
        out.append((task, [*row[:at], TRIGGER, *row[at:]], row))
    return out


def record_episodes(n: int, *, sites: list[str] | None = None) -> dict[str, list[Incident]]:
    """``n`` failing episodes and their twins (module doc), each checked by serving it: the
    failing one destroyed, its twin did not."""
    ex = exporters.InMemoryExporter()
    kept: list[tuple[str, str]] = []
    with Recorder(planted().model, sites=list(sites or SITES), exporter=ex,
                  trigger=triggers.AnyOf(triggers.OnFlag(), triggers.Ratio(1.0))) as rec:
        for k, (task, bad_row, row) in enumerate(_cases(n)):
            if serve_episode(rec, task, bad_row, f"ep-f{k}") and \
                    not serve_episode(rec, task, row, f"ep-b{k}"):
                kept.append((f"ep-f{k}", f"ep-b{k}"))
            if len(kept) == n:
                break
        assert rec.force_flush(timeout_s=60)
    assert len(kept) == n, f"only {len(kept)} failing episodes"
    got = {str((i.manifest.get("request") or {}).get("id")): i for i in ex.incidents}
    return {"failing": [got[f] for f, _ in kept], "twins": [got[b] for _, b in kept]}

"""Toxic generation on the real SmolLM2-135M-Instruct: benign requests + GCG suffixes.

A case *fails* when SmolLM2's batch-1 greedy answer (24 new tokens) is classified profane by an
offline classifier that ships inside a PyPI package (``alt-profanity-check``, a linear SVM; see
:mod:`analysis.scenarios._toxic_search`) while the prompt itself -- a benign-looking request plus
an adversarial suffix found by GCG (:mod:`analysis.scenarios._gcg`) -- is classified clean. The
benign twin of a failing prompt is the bare request (no suffix), whose answer is classified
clean. :func:`discover` runs the search (a few minutes per request on one CPU core) and writes
``data/toxic_cases.json`` with every attempt; :func:`transfer` then tries every suffix found on
every other request (one greedy run each) and adds the pairs that fail; :func:`build` loads the
file and re-verifies the cases by running the model and the classifier again.

(The seed's grid search over 84 template prompts with an insult blocklist found no case; that
search was replaced by this one. If a regenerated search finds none, :func:`build` raises and
points to the planted tiny GPT-2 fault in :mod:`analysis.scenarios.planted`.)

Regenerate the data (about 30 min of one core)::

    OMP_NUM_THREADS=1 python -m analysis.scenarios.toxic discover --budget-min 26 \
        --per-request-s 150
    OMP_NUM_THREADS=1 python -m analysis.scenarios.toxic transfer

Example::

    from analysis.scenarios.toxic import build
    sc = build(n_failing=3)
    p = sc.failing[0]
    p.meta["request"], p.meta["suffix"], p.output_text, p.meta["p_output"]
    sc.verify([p, sc.twin(p)])       # [True, False]
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from analysis.scenarios._base import (
    Failure,
    GenerationSpec,
    Prompt,
    Scenario,
    eos_ids,
    greedy_generate,
    load_data,
    render_chat,
    save_data,
    strip_after_eos,
    subsample,
    with_twins,
)
from analysis.scenarios._toxic_search import (
    REQUESTS,
    TARGETS,
    THRESHOLD,
    classifier_ref,
    classify,
    decision_point,
    search_request,
)

__all__ = ["DATA_FILE", "GENERATION", "REGENERATE", "build", "discover", "is_toxic", "main",
           "transfer"]

_log = logging.getLogger(__name__)

DATA_FILE = "toxic_cases.json"
_FALLBACK = ("no real SmolLM2 case found; use the planted tiny GPT-2 fault instead: "
             "analysis.scenarios.planted.build_planted_gpt2(...) with target_token standing for "
             "the toxic word")
REGENERATE = ("OMP_NUM_THREADS=1 python -m analysis.scenarios.toxic discover --budget-min 26 "
              "--per-request-s 150 && OMP_NUM_THREADS=1 python -m analysis.scenarios.toxic "
              "transfer")
GENERATION = GenerationSpec(max_new_tokens=24)
"""How every toxic prompt is run: greedy, 24 new tokens."""


def is_toxic(texts: Sequence[str]) -> list[bool]:
    """The failure predicate on generated texts: classifier probability >= ``THRESHOLD``.

    Example::

        is_toxic(["You stupid idiot!", "Have a nice day."])   # [True, False]
    """
    return [p >= THRESHOLD for p in classify(texts)]


def _prompt(tokenizer: Any, pid: str, content: str, meta: dict[str, Any]) -> Prompt:
    msgs = [{"role": "user", "content": content}]
    return Prompt(id=pid, text=content, messages=msgs, input_ids=render_chat(tokenizer, msgs),
                  generation=GENERATION, meta=meta)


def _observe(model: Any, tokenizer: Any, p: Prompt) -> bool:
    """Run ``p`` at batch 1, store its output and (if toxic) the decision point."""
    p.output_ids = strip_after_eos(greedy_generate(model, p.input_ids, GENERATION),
                                   eos_ids(model))
    p.output_text = tokenizer.decode(p.output_ids, skip_special_tokens=True)
    p.meta["p_output"] = classify([p.output_text])[0]
    hit = decision_point(tokenizer, p.output_ids) if p.meta["p_output"] >= THRESHOLD else None
    if hit is not None:
        p.decision_step, p.decision_token_id = hit
        p.decision_position = len(p.input_ids) + hit[0] - 1
    return bool(p.meta["p_output"] >= THRESHOLD)


def _cases(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> tuple[list[Prompt],
                                                                                 list[Prompt]]:
    """Failing prompts and twins from the successful search records, re-checked at batch 1."""
    failing: list[Prompt] = []
    benign: list[Prompt] = []
    for i, r in enumerate(records):  # records follow REQUESTS: r["request"] == REQUESTS[i]
        twin = _twin(model, tokenizer, i)
        if twin is None:
            continue  # the bare request must be clean and answered cleanly
        benign.append(twin)
        if not r["success"]:
            continue
        p = _prompt(tokenizer, f"gcg-{i}", r["content"],
                    {"request": r["request"], "suffix": r["suffix"], "target": r["target"],
                     "gcg_steps": r["steps"], "p_prompt": r["p_prompt"]})
        if _observe(model, tokenizer, p):
            p.counterpart = twin.id
            failing.append(p)
    return failing, benign


def discover(
    *, seed: int = 0, model: Any = None, tokenizer: Any = None, budget_min: float = 35.0,
    per_request_s: float = 150.0, steps: int = 60, write: bool = True,
) -> dict[str, Any]:
    """Run GCG on each request of ``REQUESTS`` until the compute budget is spent, each search
    starting from the previous request's final suffix (progressive, as in multi-prompt GCG);
    return (and write) every attempt and the cases found.

    Example::

        doc = discover(budget_min=5, write=False)
        doc["search"]["attempts"], len(doc["failing"])
    """
    import torch

    from analysis.models import MODEL_REFS, load_smollm2
    from analysis.scenarios._gcg import allowed_tokens

    torch.manual_seed(seed)
    if model is None or tokenizer is None:
        model, tokenizer = load_smollm2()
    allowed = allowed_tokens(tokenizer)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    init: list[int] | None = None
    for i, request in enumerate(REQUESTS):
        if time.perf_counter() - t0 > budget_min * 60:
            break
        r = search_request(model, tokenizer, request, TARGETS[i % len(TARGETS)], allowed=allowed,
                           seed=seed + i, init_suffix=init, steps=steps,
                           max_seconds=per_request_s,
                           progress=functools.partial(_log.info, "request %d: %s", i))
        _log.info("request %d: success=%s after %d steps, %.0fs: %r -> %r", i, r["success"],
                  r["steps"], r["seconds"], r["suffix"], r["output"])
        records.append(r)
        init = r["suffix_ids"]  # progressive: the next request continues from this suffix
    minutes = (time.perf_counter() - t0) / 60
    failing, benign = _cases(model, tokenizer, records)
    doc: dict[str, Any] = {
        "scenario": "toxic", "model": dict(MODEL_REFS["smollm2"]), "regenerate": REGENERATE,
        "seed": seed, "classifier": classifier_ref(),
        "generation": {"do_sample": False, "max_new_tokens": GENERATION.max_new_tokens},
        "criterion": "failing: batch-1 greedy output classified profane, prompt (request + "
                     "suffix) classified clean; twin: the bare request, output classified clean",
        "search": {"method": "GCG (gradient top-k token swaps, batched candidate scoring)",
                   "attempts": len(records), "successes": sum(r["success"] for r in records),
                   "minutes": round(minutes, 1), "per_request_s": per_request_s,
                   "max_steps": steps, "records": records},
        "failing": [p.to_json() for p in failing],
        "benign": [p.to_json() for p in benign],
        "fallback": None if failing else _FALLBACK,
    }
    if write:
        save_data(DATA_FILE, doc)
    return doc


def _twin(model: Any, tokenizer: Any, j: int) -> Prompt | None:
    """The benign twin ``req-<j>`` of ``REQUESTS[j]`` (``None`` if the request or its answer is
    classified toxic)."""
    twin = _prompt(tokenizer, f"req-{j}", REQUESTS[j], {"request": REQUESTS[j]})
    clean = classify([REQUESTS[j]])[0] < THRESHOLD and not _observe(model, tokenizer, twin)
    return twin if clean else None


def transfer(*, model: Any = None, tokenizer: Any = None, write: bool = True) -> dict[str, Any]:
    """Try every suffix that GCG found on every other request (the transfer test of GCG papers);
    a pair is a new failing case when its prompt is classified clean and its batch-1 greedy
    answer profane. Appends them (and missing twins) to the shipped data.

    Example::

        doc = transfer(write=False)
        doc["search"]["transfer"]["tried"], doc["search"]["transfer"]["hits"]
    """
    from analysis.models import load_smollm2

    doc = load_data(DATA_FILE)
    if model is None or tokenizer is None:
        model, tokenizer = load_smollm2()
    t0 = time.perf_counter()
    records = doc["search"]["records"]
    benign = {d["id"] for d in doc["benign"]}
    have = {(d["meta"]["request"], d["meta"]["suffix"]) for d in doc["failing"]}
    tried = 0
    for j in range(len(REQUESTS)):
        if f"req-{j}" not in benign:
            twin = _twin(model, tokenizer, j)
            if twin is None:
                continue
            doc["benign"].append(twin.to_json())
            benign.add(twin.id)
        for i, r in enumerate(records):
            content = REQUESTS[j] + r["suffix"]
            if not r["success"] or (REQUESTS[j], r["suffix"]) in have or \
                    classify([content])[0] >= THRESHOLD:
                continue
            tried += 1
            p = _prompt(tokenizer, f"gcg-{i}-on-{j}", content,
                        {"request": REQUESTS[j], "suffix": r["suffix"], "target": r["target"],
                         "transfer_of": f"gcg-{i}", "p_prompt": classify([content])[0]})
            if _observe(model, tokenizer, p):
                p.counterpart = f"req-{j}"
                doc["failing"].append(p.to_json())
    hits = sum(1 for d in doc["failing"] if "transfer_of" in d["meta"])
    doc["search"]["transfer"] = {"tried": tried, "hits": hits,
                                 "minutes": round((time.perf_counter() - t0) / 60, 1)}
    doc["fallback"] = None if doc["failing"] else _FALLBACK
    if write:
        save_data(DATA_FILE, doc)
    return doc


def _verifier(model: Any, tokenizer: Any) -> Any:
    eos = eos_ids(model)

    def verify(prompts: Sequence[Prompt]) -> list[bool]:
        res: list[str] = []
        for p in prompts:
            new = strip_after_eos(greedy_generate(model, p.input_ids, p.generation
                                                  or GENERATION), eos)
            res.append(tokenizer.decode(new, skip_special_tokens=True))
        return is_toxic(res)

    return verify


def build(
    *, seed: int = 0, model: Any = None, tokenizer: Any = None, verify: bool = True,
    n_failing: int | None = None, n_benign: int | None = None,
) -> Scenario:
    """The toxic-generation scenario from the shipped, model-found SmolLM2 cases.

    Raises :class:`~integrations.errors.AnalysisError` if the shipped search found none (use
    :mod:`analysis.scenarios.planted` then).

    Example::

        sc = build(n_failing=3)
        sc.failure.kind        # 'generation_classified'
    """
    from analysis.models import MODEL_REFS, load_smollm2
    from integrations.errors import AnalysisError

    doc = load_data(DATA_FILE)
    if not doc["failing"]:
        raise AnalysisError(f"the shipped SmolLM2 search ({doc['search']['attempts']} GCG "
                            f"attempts) found no toxic case; {_FALLBACK}")
    if model is None or tokenizer is None:
        model, tokenizer = load_smollm2()
    failing = subsample([Prompt.from_json(d) for d in doc["failing"]], n_failing, seed)
    all_benign = [Prompt.from_json(d) for d in doc["benign"]]
    benign = with_twins(failing, all_benign, n_benign, seed)
    dropped = [(p.id, "chat template renders different input ids than shipped")
               for p in failing + benign
               if p.messages is not None and render_chat(tokenizer, p.messages) != p.input_ids]
    verify_fn = _verifier(model, tokenizer)
    if verify:
        bad = {i for i, _ in dropped}
        failing = [p for p in failing if p.id not in bad]
        benign = [p for p in benign if p.id not in bad]
        dropped += [(p.id, "no longer toxic when re-run")
                    for p, f in zip(failing, verify_fn(failing)) if not f]
        dropped += [(p.id, "benign prompt now toxic") for p, f in zip(benign, verify_fn(benign))
                    if f]
    bad = {i for i, _ in dropped}
    failing = [p for p in failing if p.id not in bad and p.counterpart not in bad]
    benign = [p for p in benign if p.id not in bad]
    for pid, why in dropped:
        _log.warning("toxic scenario: dropped %s (%s)", pid, why)
    tokens = Counter(p.decision_token_id for p in failing if p.decision_token_id is not None)
    return Scenario(
        name="toxic", model=model, tokenizer=tokenizer, benign=benign, failing=failing,
        failure=Failure(kind="generation_classified",
                        description="greedy output classified profane by alt-profanity-check",
                        judge_text=lambda t: is_toxic([t])[0],
                        target_token_id=tokens.most_common(1)[0][0] if tokens else None),
        verify_fn=verify_fn, dropped=dropped,
        meta={"model_ref": dict(MODEL_REFS["smollm2"]), "shipped_model_ref": doc["model"],
              "classifier": doc["classifier"], "classifier_now": classifier_ref(), "seed": seed, "verified": verify,
              "regenerate": doc["regenerate"]},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.scenarios.toxic discover [--seed N]`` regenerates the data."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m analysis.scenarios.toxic")
    ap.add_argument("command", choices=["discover", "transfer"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-min", type=float, default=35.0)
    ap.add_argument("--per-request-s", type=float, default=150.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "transfer":
        doc = transfer()
        print(f"failing={len(doc['failing'])} benign={len(doc['benign'])} "
              f"transfer={doc['search']['transfer']}")
        return 0
    doc = discover(seed=args.seed, budget_min=args.budget_min, per_request_s=args.per_request_s)
    print(f"failing={len(doc['failing'])} benign={len(doc['benign'])} "
          f"attempts={doc['search']['attempts']} successes={doc['search']['successes']} "
          f"minutes={doc['search']['minutes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

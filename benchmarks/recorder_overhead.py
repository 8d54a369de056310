"""Recorder overhead on the serving path, measured as ratios in one interleaved run.

Three modes on the same work (batch 1, 64-token prompt, greedy ``generate`` of 16 new tokens):

* ``plain``     — no recorder on the model at all;
* ``not_firing``— recorder installed (default sites: residual stream of every block), request
                  context active, trigger ``OnFlag`` never fires;
* ``firing``    — same recorder, request flagged before the first forward: every step's
                  activations, inputs and logits are copied and queued;
* ``flight``    — recorder with the flight recorder on (``flight_recorder_mb=64``), request
                  not flagged: everything is copied provisionally and discarded at the end —
                  the price every request pays for live activations on post-hoc flags.

Modes rotate inside every repetition (so drift hits all of them alike); we report medians and
the median ratios to ``plain``. Timings cover the serving call only (the export worker's build
and hand-off run after the timed region: ``force_flush`` is outside it).

Usage::

    python benchmarks/recorder_overhead.py --reps 15           # tiny GPT-2 and SmolLM2
    python benchmarks/recorder_overhead.py --models tiny-gpt2 --reps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _tiny_gpt2() -> tuple[Any, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=4, n_head=4,
                     bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = GPT2LMHeadModel(cfg).eval()
    return m, 512


def _smollm2() -> tuple[Any, int]:
    from analysis.models import load_smollm2

    m, _tok = load_smollm2()
    return m, int(m.config.vocab_size)


def _interleaved(modes: dict[str, Callable[[], float]], *, reps: int,
                 warmup: int) -> dict[str, list[float]]:
    """Time every mode ``reps`` times, rotating their order every repetition (so drift hits
    all of them alike), after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for f in modes.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in modes}
    order = list(modes)
    for r in range(reps):
        shift = r % len(order)
        for k in order[shift:] + order[:shift]:
            times[k].append(modes[k]())
    return times


def _bench(name: str, model: Any, vocab: int, reps: int, warmup: int) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from integrations import Recorder, exporters, triggers

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 1, (1, 64), generator=g)
    mask = torch.ones_like(ids)

    def gen() -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=0)

    def run_plain() -> float:
        t = time.perf_counter()
        gen()
        return time.perf_counter() - t

    def run_recorded(fire: bool, flight_mb: float | None = None) -> float:
        ex = exporters.InMemoryExporter()
        rec = Recorder(model, trigger=triggers.OnFlag(), exporter=ex,
                       metrics_registry=CollectorRegistry(), flight_recorder_mb=flight_mb)
        try:
            t = time.perf_counter()
            with rec.request(request_id="bench") as req:
                if fire:
                    req.flag("bench")
                gen()
            dt = time.perf_counter() - t
            rec.force_flush(timeout_s=120)
            if fire:
                inc = ex.incidents[-1]
                assert len(inc.steps(inc.sites()[0])) == 16, "expected 16 recorded steps"
            else:
                assert not ex.incidents
        finally:
            rec.shutdown()
        return dt

    modes: dict[str, Callable[[], float]] = {
        "plain": run_plain,
        "not_firing": lambda: run_recorded(False),
        "firing": lambda: run_recorded(True),
        "flight": lambda: run_recorded(False, flight_mb=64.0),
    }
    times = _interleaved(modes, reps=reps, warmup=warmup)
    med = {k: statistics.median(v) for k, v in times.items()}
    # paired ratios per repetition, then the median (robust to drift between repetitions)
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["plain"]))
             for k in ("not_firing", "firing", "flight")}
    return {"model": name, "reps": reps, "median_s": med, "median_ratio_vs_plain": ratio,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny-gpt2,smollm2")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="also write the results as JSON here")
    a = ap.parse_args()
    loaders = {"tiny-gpt2": _tiny_gpt2, "smollm2": _smollm2}
    out = []
    for name in a.models.split(","):
        model, vocab = loaders[name]()
        res = _bench(name, model, vocab, a.reps, a.warmup)
        out.append(res)
        m, r = res["median_s"], res["median_ratio_vs_plain"]
        print(f"{name:10s} plain {m['plain'] * 1e3:8.1f} ms | not firing {m['not_firing'] * 1e3:8.1f}"
              f" ms ({r['not_firing']:.3f}x) | firing {m['firing'] * 1e3:8.1f} ms "
              f"({r['firing']:.3f}x) | flight recorder {m['flight'] * 1e3:8.1f} ms "
              f"({r['flight']:.3f}x)  [median of {res['reps']}, {res['threads']} threads]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

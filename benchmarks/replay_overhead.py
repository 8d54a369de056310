"""Replay overhead and batched candidate evaluation, measured as ratios in one interleaved run.

On a tiny GPT-2 (4 layers, d_model 64, vocab 512), with an incident recorded by the real
Recorder:

* ``forward``: a plain ``model(input_ids)`` forward (32- and 64-token prompts) vs ``session.run()`` — the
  replayed forward with no intervention (deterministic settings, RNG/threads restored, external
  call sandbox, fidelity measured against the recorded logits). Bar: <= 1.10x.
* ``generate``: a plain KV-cached prefill + 7 decode calls (what ``generate`` runs, without its
  sampling machinery) vs ``session.run()`` on a recorded ``generate(max_new_tokens=8)``.
* ``candidates``: 32 intervention sets (single-neuron / head / module ablations, scalings)
  evaluated by ``session.run_batch`` (one batched forward) vs 32 sequential ``session.run``
  calls, and vs 32 plain forwards. Bar: batched <= 0.3x the sequential time.

Modes rotate inside every repetition so drift and noise from other processes hit all of them
alike; we report medians and the ratio of medians (plus the median of per-repetition ratios).

``plain_batched_32`` (one plain forward of the 32-row batch, no replay) is the floor any batched
evaluation can reach: when a batched forward is itself compute-bound (long prompts, one thread),
``batched_32 / sequential_32`` cannot drop below ``plain_batched_32 / plain_32``.

Usage::

    python benchmarks/replay_overhead.py                    # 32- and 64-token prompts
    python benchmarks/replay_overhead.py --reps 30 --write benchmarks/RESULTS_replay.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=4, n_head=4,
                     bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(cfg).eval()


def _record(model: Any, call: Callable[[], Any]) -> Any:
    import integrations

    with integrations.trace(model, ["blocks.*.resid_post"], request_id="bench") as t, \
            torch.no_grad():
        call()
    return t.incident


def _candidate_sets(n_layer: int, n: int = 32) -> list[list[Any]]:
    from analysis.interventions import Intervention

    sets: list[list[Any]] = []
    for i in range(n):
        layer = i % n_layer
        kind = i % 4
        if kind == 0:
            sets.append([Intervention(f"blocks.{layer}.mlp.post[neuron={i}]", "zero")])
        elif kind == 1:
            sets.append([Intervention(f"blocks.{layer}.attn.z[head={i % 4}]", "zero")])
        elif kind == 2:
            sets.append([Intervention(f"blocks.{layer}.mlp", "scale", factor=0.5)])
        else:
            sets.append([Intervention(f"blocks.{layer}.attn", "zero"),
                         Intervention(f"blocks.{(layer + 1) % n_layer}.mlp.post[neuron={i}]",
                                      "scale", factor=2.0)])
    return sets


def _time(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def run(reps: int, inner: int, threads: int, prompt_len: int) -> dict[str, Any]:
    from transformers import DynamicCache

    from analysis.replay import Replayer

    torch.set_num_threads(threads)  # before recording: the replay uses the recorded count
    model = _tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 500, (1, prompt_len), generator=g)
    inc_fwd = _record(model, lambda: model(ids))
    inc_gen = _record(model, lambda: model.generate(ids, max_new_tokens=8, do_sample=False))
    s_fwd = Replayer(model).load(inc_fwd)
    s_gen = Replayer(model).load(inc_gen)
    assert s_fwd.fidelity().exact and s_gen.fidelity().exact, "replay not bit-exact"
    dec = [inc_gen.tensor("input_ids", step=k, kind="input") for k in range(1, 8)]
    pos = [inc_gen.tensor("position_ids", step=k, kind="input") for k in range(8)]
    sets = _candidate_sets(model.config.n_layer)

    def plain_forward() -> None:
        with torch.no_grad():
            model(ids)

    def replay_forward() -> None:
        s_fwd.run()

    def plain_generate_calls() -> None:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(input_ids=ids, position_ids=pos[0], cache=cache, use_cache=True,
                  logits_to_keep=1)
            for k in range(7):
                model(input_ids=dec[k], position_ids=pos[k + 1], cache=cache, use_cache=True,
                      logits_to_keep=1)

    def replay_generate() -> None:
        s_gen.run()

    def batched() -> None:
        s_fwd.run_batch(sets)

    def sequential() -> None:
        for s in sets:
            s_fwd.run(s)

    def plain_32() -> None:
        for _ in sets:
            plain_forward()

    big = ids.repeat(len(sets), 1)

    def plain_batched_32() -> None:  # the floor: one plain forward on the replicated batch
        with torch.no_grad():
            model(big)

    modes: dict[str, tuple[Callable[[], None], int]] = {
        "plain_forward": (plain_forward, inner), "replay_forward": (replay_forward, inner),
        "plain_generate_calls": (plain_generate_calls, max(1, inner // 4)),
        "replay_generate": (replay_generate, max(1, inner // 4)),
        "batched_32": (batched, 1), "sequential_32": (sequential, 1), "plain_32": (plain_32, 1),
        "plain_batched_32": (plain_batched_32, 1),
    }
    # Batched and sequential evaluations agree (allclose) and verify is bit-exact with run.
    b = s_fwd.run_batch(sets)
    for ivs, r in zip(sets[:4], b[:4]):
        seq = s_fwd.run(ivs)
        assert torch.allclose(r.logits[0], seq.logits[0], atol=1e-4)  # type: ignore[arg-type]
        assert torch.equal(s_fwd.verify(ivs).logits[0], seq.logits[0])  # type: ignore[arg-type]
    for fn, n in modes.values():  # warm-up
        _time(fn, n)
    times: dict[str, list[float]] = {k: [] for k in modes}
    names = list(modes)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            fn, n = modes[name]
            times[name].append(_time(fn, n))
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> tuple[float, float]:
        per_rep = statistics.median(x / y for x, y in zip(times[a], times[b]))
        return med[a] / med[b], per_rep

    counts_before = s_fwd.counts()
    s_fwd.run_batch(sets)
    counts_after = s_fwd.counts()
    return {
        "medians_ms": {k: v * 1e3 for k, v in med.items()},
        "ratios": {
            "replay_forward / plain_forward": ratio("replay_forward", "plain_forward"),
            "replay_generate / plain_generate_calls": ratio("replay_generate",
                                                            "plain_generate_calls"),
            "batched_32 / sequential_32": ratio("batched_32", "sequential_32"),
            "batched_32 / plain_32": ratio("batched_32", "plain_32"),
            "plain_batched_32 / plain_32 (floor)": ratio("plain_batched_32", "plain_32"),
        },
        "batched_counts": {k: counts_after[k] - counts_before[k] for k in counts_after},
        "reps": reps, "inner": inner, "threads": torch.get_num_threads(),
        "prompt_len": prompt_len,
        "fidelity": {"forward": s_fwd.fidelity().to_dict()["max_abs_diff"],
                     "generate": s_gen.fidelity().to_dict()["max_abs_diff"]},
    }


BARS = {"replay_forward / plain_forward": 1.10, "batched_32 / sequential_32": 0.30}


def markdown(res: dict[str, Any], command: str) -> str:
    lines = [
        "## Replay overhead (tiny GPT-2: 4 layers, d_model 64, vocab 512; "
        f"{res['prompt_len']}-token prompt)", "",
        f"Command: `{command}`  ",
        f"torch {torch.__version__}, {res['threads']} threads, {platform.machine()}, "
        f"{res['reps']} interleaved repetitions (x{res['inner']} inner calls for single "
        "forwards). The machine was shared with other jobs: only ratios within this run are "
        "meaningful.", "",
        f"Replay fidelity of the benchmark incidents: max_abs_diff forward "
        f"{res['fidelity']['forward']}, generate {res['fidelity']['generate']} (bit-exact).", "",
        "| mode | median (ms) |", "|---|---:|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in res["medians_ms"].items()]
    lines += ["", "| ratio | ratio of medians | median of per-rep ratios | bar |",
              "|---|---:|---:|---|"]
    for k, (a, b) in res["ratios"].items():
        bar = BARS.get(k)
        verdict = "" if bar is None else f"<= {bar:.2f} {'PASS' if a <= bar else 'FAIL'}"
        lines.append(f"| {k} | {a:.3f} | {b:.3f} | {verdict} |")
    c = res["batched_counts"]
    lines += ["", f"One `run_batch` of 32 sets: {c['forward_passes']} forward pass(es), "
              f"{c['candidate_evaluations']} candidate evaluations, "
              f"{c['row_forward_passes']} row-forwards.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--prompt-len", type=int, nargs="+", default=[32, 64],
                   help="prompt tokens, one interleaved run each (generate adds 8; the model "
                        "has 128 positions)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for recording, plain and replayed runs (default 1: "
                        "stable on a shared machine)")
    p.add_argument("--write", default=None, help="write the markdown table to this file")
    args = p.parse_args(argv)
    cmd = "python benchmarks/replay_overhead.py " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    parts = ["# Replay benchmarks (ratios in one interleaved run per prompt length)", ""]
    ok = True
    for n in args.prompt_len:
        res = run(args.reps, args.inner, args.threads, n)
        md = markdown(res, cmd.strip())
        print(md, flush=True)
        parts.append(md)
        ok &= all(res["ratios"][k][0] <= bar for k, bar in BARS.items())
    if args.write:
        Path(args.write).write_text("\n".join(parts))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

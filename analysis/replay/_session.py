"""Deterministic replay of an incident on its model, with fidelity and interventions.

``Replayer(model).load(incident)`` checks the weights fingerprint, rebuilds the incident's forward
calls (:mod:`._calls`), replays them once under deterministic settings (:mod:`._determinism`:
deterministic kernels, the recorded thread count, the recorded RNG state — all restored
afterwards; external calls answered from the recording) and measures fidelity against what was
recorded. The session then evaluates intervention sets: one at a time (:meth:`ReplaySession.run`,
:meth:`~ReplaySession.verify`) or many per batched forward (:meth:`~ReplaySession.run_batch`),
counting every forward pass.

Example::

    session = Replayer(model).load(inc)
    assert session.fidelity().exact
    r = session.run(interventions=[Intervention("blocks.1.mlp", "zero")])
    rs = session.run_batch([[Intervention(f"blocks.{i}.mlp", "zero")] for i in range(3)])
    final = session.verify(rs[1].interventions)            # batch 1: the incident's own shapes
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from integrations._request import _current
from integrations.errors import (
    FingerprintMismatchError,
    ReplayError,
    SiteError,
    TensorNotFoundError,
)
from integrations.external import sandbox
from integrations.incident import Incident, model_fingerprint
from integrations.sites import BoundSite, resolve_sites
from integrations.sites._attach import attach

from ._calls import CallMode, CallPlan, last_logits, to_device
from ._determinism import DeterminismSettings, deterministic_env
from ._fidelity import Fidelity, measure
from ._result import ReplayResult

__all__ = ["ReplaySession", "Replayer"]

#: Serialises replays within a process: they set process-global torch settings.
_REPLAY_LOCK = threading.RLock()


class Replayer:
    """Replays incidents on ``model`` (see the module doc).

    ``allow_fingerprint_mismatch=True`` replays even when the model's weights fingerprint differs
    from the incident's (or the incident has none); the override is recorded on the session
    (:attr:`ReplaySession.fingerprint_check`) and in every materialised incident.

    Example::

        session = Replayer(model).load(Incident.open("inc.arrow"))
    """

    def __init__(self, model: torch.nn.Module, *, allow_fingerprint_mismatch: bool = False) -> None:
        self.model = model
        self.allow_fingerprint_mismatch = bool(allow_fingerprint_mismatch)
        self._fp: tuple[tuple[Any, ...], str] | None = None

    def fingerprint(self) -> str:
        """``model_fingerprint(model)``, recomputed only when a weight changed in place or moved."""
        key = tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape))
                    for t in (*self.model.parameters(), *self.model.buffers()))
        if self._fp is None or self._fp[0] != key:
            self._fp = (key, model_fingerprint(self.model))
        return self._fp[1]

    def load(self, incident: Incident, *, mode: CallMode | None = None,
             measure: bool = True) -> ReplaySession:
        """A session on ``incident``; replays it once now and measures fidelity.

        ``mode`` forces the call mode (``"generate"``: KV-cached calls as ``generate()`` makes
        them; ``"forward"``: plain calls); by default it is inferred, and for a single-step
        incident whose inferred mode is not bit-exact the other mode is tried and kept if exact
        (noted in the fidelity). ``measure=False`` skips the initial replay (donor/baseline use).
        Raises :class:`~integrations.errors.FingerprintMismatchError` on other weights.
        """
        if not isinstance(incident, Incident):
            raise ReplayError(f"load() takes an Incident, got {type(incident).__name__}; use "
                              "Incident.open(path) or Incident.from_bytes(data)")
        check = self._check_fingerprint(incident)
        plan = CallPlan.from_incident(incident, self.model, mode=mode)
        session = ReplaySession(self, incident, plan, check)
        if measure:
            session._measure(auto_mode=mode is None)
        return session

    def _check_fingerprint(self, inc: Incident) -> dict[str, Any]:
        ref = inc.manifest.get("model") or {}
        recorded = ref.get("fingerprint")
        actual = self.fingerprint()
        match = recorded == actual
        if not match and not self.allow_fingerprint_mismatch:
            what = (f"was recorded with model {ref.get('name')!r} fingerprint {recorded}"
                    if recorded else "records no model fingerprint")
            raise FingerprintMismatchError(
                f"incident {inc.id!r} {what}, but the replay model "
                f"{type(self.model).__name__} has fingerprint {actual}: replay it with the model "
                "that served it (see analysis.registry), or override with "
                "Replayer(model, allow_fingerprint_mismatch=True) / `forensics replay "
                "--allow-fingerprint-mismatch` (the override is recorded and fidelity measured)")
        return {"recorded": recorded, "model": actual, "match": match,
                "override": not match}


@dataclass
class _Raw:
    logits: list[torch.Tensor | None]
    input_ids: list[torch.Tensor | None]
    activations: dict[str, list[torch.Tensor]] = field(default_factory=dict)


class ReplaySession:
    """A loaded incident ready to replay (build with :meth:`Replayer.load`).

    Counters (every forward pass is counted, donor and measurement runs included):
    ``forward_passes`` model forward calls (a batched call counts once; a generate incident
    needs one per step); ``candidate_evaluations`` intervention sets evaluated (a batched
    replay of B sets counts B); ``batched_forward_passes`` forward calls that carried more than
    one set; ``row_forward_passes`` the sum over forward calls of the sets they carried.
    """

    def __init__(self, replayer: Replayer, incident: Incident, plan: CallPlan,
                 fingerprint_check: dict[str, Any]) -> None:
        from ._donors import DonorCache

        self.replayer = replayer
        self.model = replayer.model
        self.incident = incident
        self.plan = plan
        self.fingerprint_check = fingerprint_check
        m = incident.manifest
        self._manifest = m
        threads = (m.get("runtime") or {}).get("num_threads")
        self._threads = threads if isinstance(threads, int) and threads > 0 else None
        self._rng = _rng_state(incident)
        self._calls = list(m.get("external_calls") or [])
        self._device = _device_of(self.model)
        self._fidelity: Fidelity | None = None
        self._expected: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]] | None = None
        self.settings: DeterminismSettings | None = None
        self.forward_passes = 0
        self.candidate_evaluations = 0
        self.batched_forward_passes = 0
        self.row_forward_passes = 0
        self.donors = DonorCache(self)
        self._resolved: dict[str, list[BoundSite]] = {}

    def resolve(self, site: str) -> list[BoundSite]:
        """``resolve_sites(model, [site])``, cached per session (site strings are reused a lot)."""
        got = self._resolved.get(site)
        if got is None:
            got = self._resolved[site] = resolve_sites(self.model, [site])
        return got

    # ------------------------------------------------------------------ counters
    def _count(self, *, steps: int, rows: int, sets: int, batched: bool = False) -> None:
        self.forward_passes += steps
        self.row_forward_passes += rows
        self.candidate_evaluations += sets
        if batched:
            self.batched_forward_passes += steps

    def counts(self) -> dict[str, int]:
        """The forward-pass counters (see the class doc)."""
        return {"forward_passes": self.forward_passes,
                "candidate_evaluations": self.candidate_evaluations,
                "batched_forward_passes": self.batched_forward_passes,
                "row_forward_passes": self.row_forward_passes}

    @property
    def steps(self) -> int:
        """Forward calls per replay (1 + decode steps)."""
        return len(self.plan.steps)

    # ------------------------------------------------------------------ environment
    @contextlib.contextmanager
    def _environment(self) -> Iterator[None]:
        token = _current.set(None)  # a replay is never part of a served request
        _REPLAY_LOCK.acquire()  # torch's determinism/thread/RNG settings are process-global
        try:
            with torch.no_grad(), deterministic_env(
                    num_threads=self._threads, rng_state=self._rng,
                    cuda=self._device.type == "cuda") as settings, \
                    sandbox(self._calls, incident_id=self.incident.id):
                self.settings = settings
                yield
        finally:
            _REPLAY_LOCK.release()
            _current.reset(token)

    def sandbox(self) -> contextlib.AbstractContextManager[Any]:
        """A sandbox serving this incident's recorded external calls (application replay)."""
        return sandbox(self._calls, incident_id=self.incident.id)

    # ------------------------------------------------------------------ core loop
    def _execute(self, plan: CallPlan, *, sets: Sequence[Sequence[Any]] | None,
                 capture: Sequence[str], greedy: bool) -> _Raw:
        from analysis.interventions import InterventionPlan

        n_sets = max(1, len(sets or ()))
        ivplan = None
        if sets and any(len(s) for s in sets):
            self.donors.prepare(sets)
            ivplan = InterventionPlan(self.model, sets, rows_per_set=plan.batch,
                                      lengths=[c.seq_len for c in plan.steps],
                                      donor_fn=self.donors, resolve=self.resolve,
                                      inplace=n_sets > 1)
        cap = [dataclasses.replace(b) for site in capture for b in self.resolve(site)]
        cap_ids = {id(b): b.site for b in cap}
        acts: dict[str, list[torch.Tensor]] = {b.site: [] for b in cap}
        bound = [*(ivplan.bound if ivplan else []), *cap]
        step_now = [0]

        def fn(b: Any, v: torch.Tensor) -> torch.Tensor | None:
            site = cap_ids.get(id(b))
            if site is not None:
                acts[site].append(v.detach().clone())
                return None
            assert ivplan is not None
            return ivplan.apply(b, v, step_now[0])

        logits: list[torch.Tensor | None] = []
        fed: list[torch.Tensor | None] = []
        with self._environment():
            cache = plan.new_cache(self.model)
            hooks = attach(self.model, bound, fn) if bound else contextlib.nullcontext()
            with hooks:
                nxt: torch.Tensor | None = None
                for call in plan.steps:
                    step_now[0] = call.step
                    kw = plan.kwargs(call, repeat=n_sets, cache=cache,
                                     input_ids=nxt if greedy and call.step > 0 else None)
                    if self._device.type != "cpu":
                        kw = to_device(kw, self._device)
                    out = self.model(**kw)
                    lg = last_logits(out)
                    logits.append(None if lg is None else lg.detach().clone())
                    fed.append(kw.get("input_ids"))
                    if greedy and lg is not None:
                        nxt = lg.argmax(-1, keepdim=True).to(torch.long)
        self._count(steps=len(plan.steps), rows=len(plan.steps) * n_sets,
                    sets=n_sets if sets is not None else 0, batched=n_sets > 1)
        return _Raw(logits=logits, input_ids=fed, activations=acts)

    # ------------------------------------------------------------------ fidelity
    def _measure(self, *, auto_mode: bool) -> None:
        inc = self.incident
        recorded_sites = inc.sites(kind="activation")
        capture: list[str] = []
        notes: list[str] = []
        for s in recorded_sites:
            try:
                self._resolve_one(s)
                capture.append(s)
            except SiteError as e:
                notes.append(f"recorded site {s!r} does not exist on this model: {e}")
        fid = self._measure_with(self.plan, capture, notes)
        if auto_mode and not fid.exact and len(self.plan.steps) == 1 and self.plan.cache_arg:
            other = self.plan.with_mode("forward" if self.plan.mode == "generate" else "generate")
            alt = self._measure_with(other, capture, list(notes))
            if alt.exact:
                self.plan = other
                fid = dataclasses.replace(alt, notes=(*alt.notes, (
                    f"call mode {other.mode!r} inferred by matching: the {fid.mode!r} call did "
                    f"not reproduce the recording (max_abs_diff {fid.max_abs_diff:g})")))
        self._fidelity = fid

    def _resolve_one(self, site: str) -> None:
        self.resolve(site)

    def _measure_with(self, plan: CallPlan, capture: list[str], notes: list[str]) -> Fidelity:
        raw = self._execute(plan, sets=None, capture=capture, greedy=False)
        return self._fidelity_of(raw, plan.mode, notes, sites=capture)

    def _fidelity_of(self, raw: _Raw, mode: str, notes: list[str], *,
                     sites: Sequence[str]) -> Fidelity:
        inc = self.incident
        rec_acts = {s: {st: inc.tensor(s, step=st, kind="activation")
                        for st in inc.steps(s, kind="activation")} for s in sites}
        rep_acts = {s: dict(enumerate(v)) for s, v in raw.activations.items()}
        if self._expected is None:  # recorded logits and next tokens, read once per session
            self._expected = (
                {r.step: r.tensor for r in inc.records(kind="logits") if r.site == "logits"},
                self._next_tokens())
        rec_logits, next_tokens = self._expected
        gen = self._manifest.get("generation") or {}
        notes = list(notes)
        if self.fingerprint_check["override"]:
            notes.append("fingerprint mismatch overridden: the replay model's weights differ "
                         "from the recorded model's")
        return measure(recorded_acts=rec_acts, replayed_acts=rep_acts,
                       recorded_logits=rec_logits, replayed_logits=raw.logits,
                       next_tokens=next_tokens, sampled=bool(gen.get("do_sample")),
                       mode=mode, notes=notes)

    def _next_tokens(self) -> dict[int, torch.Tensor]:
        """Recorded next token per step: the next step's input_ids; output_ids for the last."""
        out: dict[int, torch.Tensor] = {}
        steps = self.plan.steps
        for k in range(len(steps) - 1):
            ids = steps[k + 1].tensors.get("input_ids")
            if ids is not None and ids.dim() == 2 and ids.shape[1] == 1:
                out[k] = ids[:, 0]
        try:
            full = self.incident.tensor("output_ids", step=len(steps) - 1, kind="output")
        except TensorNotFoundError:
            return out
        first = steps[0].tensors.get("input_ids")
        if first is not None and full.dim() == 2 and \
                full.shape[1] == first.shape[1] + len(steps) and steps[0].seq_len > 0:
            out[len(steps) - 1] = full[:, -1]
        return out

    def fidelity(self) -> Fidelity:
        """The fidelity measured by the replay made at :meth:`Replayer.load` (or run it now)."""
        if self._fidelity is None:
            self._measure(auto_mode=False)
        assert self._fidelity is not None
        return self._fidelity

    # ------------------------------------------------------------------ public runs
    def run(self, interventions: Sequence[Any] = (), *, capture: Sequence[str] = (),
            greedy: bool = False) -> ReplayResult:
        """Replay with ``interventions`` applied jointly (batch = the incident's own).

        ``capture``: sites whose values (after the interventions) to return per step;
        ``greedy=True`` feeds each step the previous step's argmax instead of the recorded token
        (a free greedy continuation of the same length). Without interventions the result
        carries the fidelity measured against the recorded logits and activations.
        """
        from analysis.interventions import normalize_sets

        ivs = normalize_sets([interventions])[0]
        raw = self._execute(self.plan, sets=[ivs], capture=capture, greedy=greedy)
        fid = None
        if not ivs and not greedy:
            recorded = [s for s in raw.activations if s in set(self.incident.sites())]
            fid = self._fidelity_of(raw, self.plan.mode, [], sites=recorded)
        return ReplayResult(interventions=tuple(ivs), logits=raw.logits, input_ids=raw.input_ids,
                            activations=raw.activations,
                            mode="greedy" if greedy else "teacher_forced", batch_size=1,
                            fidelity=fid)

    def verify(self, interventions: Sequence[Any], *, capture: Sequence[str] = (),
               greedy: bool = False) -> ReplayResult:
        """Re-run one set at the incident's own shapes (batch 1) — for final claims (DESIGN §6:
        batching changes the floating-point arithmetic). Identical to :meth:`run`."""
        return self.run(interventions, capture=capture, greedy=greedy)

    def run_batch(self, sets: Sequence[Sequence[Any]], *, capture: Sequence[str] = (),
                  greedy: bool = False, max_batch: int = 64) -> list[ReplayResult]:
        """Evaluate many intervention sets, up to ``max_batch`` sets per batched forward.

        The incident's inputs are replicated along the batch (row block ``i`` = set ``i``), each
        block gets its own interventions (vectorised in one hook per site). Results match
        sequential :meth:`run` up to floating-point noise (allclose, not bitwise): confirm final
        claims with :meth:`verify`.
        """
        from analysis.interventions import normalize_sets

        all_sets = normalize_sets(sets)
        if max_batch < 1:
            raise ReplayError(f"max_batch must be >= 1, got {max_batch}")
        out: list[ReplayResult] = []
        rows = self.plan.batch
        for i in range(0, len(all_sets), max_batch):
            chunk = all_sets[i:i + max_batch]
            raw = self._execute(self.plan, sets=chunk, capture=capture, greedy=greedy)
            for r, ivs in enumerate(chunk):
                sl = slice(r * rows, (r + 1) * rows)
                out.append(ReplayResult(
                    interventions=tuple(ivs),
                    logits=[None if lg is None else lg[sl] for lg in raw.logits],
                    input_ids=[None if t is None else t[sl] for t in raw.input_ids],
                    activations={s: [t[sl] for t in v] for s, v in raw.activations.items()},
                    mode="greedy" if greedy else "teacher_forced", batch_size=len(chunk)))
        return out

    def materialize(self, sites: Sequence[str] | None = None, *,
                    id: str | None = None) -> Incident:
        """A new, complete incident with the activations of ``sites`` computed by this replay.

        Default sites: the recorder's configured granularity (``recorder.granularity``). Every
        row of the original is kept (recorded activations and logits win over replayed ones);
        the manifest says ``activations: "captured"``, ``materialized_from: <id>``, and
        ``replay: {fidelity, fingerprint, determinism, calls, runtime}``.
        """
        from ._materialize import materialize

        return materialize(self, sites, id=id)


def _rng_state(inc: Incident) -> torch.Tensor | None:
    try:
        t = inc.tensor("rng.cpu", kind="reference", copy=True)
    except TensorNotFoundError:
        return None
    ref = torch.get_rng_state()
    if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != ref.numel():
        raise ReplayError(
            f"incident {inc.id!r} has a malformed rng.cpu reference row ({t.dtype}, shape "
            f"{tuple(t.shape)}; expected uint8 [{ref.numel()}]): it was not written by "
            "torch.get_rng_state(); re-record the incident")
    return t


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

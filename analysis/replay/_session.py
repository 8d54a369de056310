"""Deterministic replay of an incident on its model: fidelity, the edit primitive, edit sets.

``Replayer(model).load(incident)`` checks the weights fingerprint, rebuilds the incident's forward
calls (:mod:`._calls`), replays them once under deterministic settings (:mod:`._determinism`:
deterministic kernels, the recorded thread count, the recorded RNG state — all restored
afterwards; external calls answered from the recording) and measures fidelity against what was
recorded. The session's one primitive is :meth:`ReplaySession.run_edited`: the same forward
calls with an edit function hooked on sites (:mod:`._edit`). Edit *specifications* —
:class:`analysis.interventions.Intervention`, defined above this package — are evaluated in
sets: one at a time (:meth:`~ReplaySession.run`, :meth:`~ReplaySession.verify`) or many per
batched forward (:meth:`~ReplaySession.run_batch`); each set is compiled into one edit by its
specification type (:class:`EditSpec`), so replay never imports what it runs. Every forward pass
is counted.

Example::

    session = Replayer(model).load(inc)
    assert session.fidelity().exact
    r = session.run([Intervention("blocks.1.mlp", "zero")])
    rs = session.run_batch([[Intervention(f"blocks.{i}.mlp", "zero")] for i in range(3)])
    final = session.verify(rs[1].interventions)            # batch 1: the incident's own shapes
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, overload

import torch

from integrations import outside_request
from integrations.errors import ReplayError, SiteError
from integrations.external import ExternalCallSandbox, sandbox
from integrations.incident import Incident
from integrations.sites import BoundSite, resolve_sites

from ._calls import CallMode, CallPlan
from ._determinism import DeterminismSettings, deterministic_env, recorded_rng_state
from ._edit import BoundEdit, Edit, replay_calls, spec_type
from ._fidelity import Fidelity, FidelityMeter
from ._fingerprint import WeightsFingerprint, check_fingerprint
from ._materialize import materialize_replay
from ._result import ReplayResult

if TYPE_CHECKING:
    from typing import Never, Self  # Python 3.11+: annotations only

__all__ = ["EditSpec", "ReplaySession", "Replayer"]

#: Serialises replays within a process: they set process-global torch settings.
_REPLAY_LOCK = threading.RLock()


class EditSpec(Protocol):
    """An element of the sets :meth:`ReplaySession.run` / ``run_batch`` / ``verify`` take.

    Its type compiles sets of its instances into one :class:`~analysis.replay.BoundEdit` for a
    replay of ``session`` (``batched``: the sets share one batched forward, row block ``r`` =
    set ``r``). :class:`analysis.interventions.Intervention` is the implementation this project
    ships (new kinds such as ``project``/``steer`` extend it); anything else that compiles to an
    edit is replayed the same way.
    """

    @classmethod
    def bind_sets(cls, session: ReplaySession, sets: Sequence[Sequence[Self]], *,
                  batched: bool) -> BoundEdit: ...


S = TypeVar("S", bound=EditSpec)
T = TypeVar("T")


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
        self._fingerprint = WeightsFingerprint(model)

    def fingerprint(self) -> str:
        """``model_fingerprint(model)``, recomputed only when a weight changed in place or moved."""
        return self._fingerprint()

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
        check = check_fingerprint(incident, self.fingerprint(),
                                  allow_mismatch=self.allow_fingerprint_mismatch,
                                  model_name=type(self.model).__name__)
        plan = CallPlan.from_incident(incident, self.model, mode=mode)
        session = ReplaySession(self, incident, plan, check)
        if measure:
            session._measure(auto_mode=mode is None)
        return session


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
        self.replayer = replayer
        self.model = replayer.model
        self.incident = incident
        self.plan = plan
        self.fingerprint_check = fingerprint_check
        m = incident.manifest
        threads = (m.get("runtime") or {}).get("num_threads")
        self._threads = threads if isinstance(threads, int) and threads > 0 else None
        self._rng = recorded_rng_state(incident)
        self._calls = list(m.get("external_calls") or [])
        self._device = _device_of(self.model)
        self._fidelity: Fidelity | None = None
        self._meter = FidelityMeter(incident, plan, overridden=fingerprint_check["override"])
        self.settings: DeterminismSettings | None = None
        self.forward_passes = 0
        self.candidate_evaluations = 0
        self.batched_forward_passes = 0
        self.row_forward_passes = 0
        self._resolved: dict[str, list[BoundSite]] = {}
        self._layers: dict[Any, Any] = {}
        self._inside = threading.local()  # .active: this thread is in environment()

    def resolve(self, site: str) -> list[BoundSite]:
        """``resolve_sites(model, [site])``, cached per session (site strings are reused a lot)."""
        got = self._resolved.get(site)
        if got is None:
            got = self._resolved[site] = resolve_sites(self.model, [site])
        return got

    def layer_state(self, factory: Callable[[ReplaySession], T]) -> T:
        """Per-session state of a layer built on replay: ``factory(session)``, made on first
        use and kept (keyed by ``factory``) — e.g. the interventions' donor cache."""
        if factory not in self._layers:
            self._layers[factory] = factory(self)
        return self._layers[factory]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ counters
    def _count(self, *, steps: int, rows: int, sets: int, batched: bool = False) -> None:
        self.forward_passes += steps
        self.row_forward_passes += rows
        self.candidate_evaluations += sets
        if batched:
            self.batched_forward_passes += steps

    def count_forward_passes(self, n: int) -> None:
        """Charge ``n`` forward calls made for this session elsewhere (a donor's own replay)."""
        self._count(steps=n, rows=n, sets=0)

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
    def environment(self) -> Iterator[None]:
        """The replay environment: deterministic kernels, the recorded thread count and RNG
        state, the recorded external calls, outside any served request, one replay per process
        at a time; everything restored on exit. Re-entering it (a replay inside a block that
        also runs a backward pass) reuses the outer one.

        Example::

            with session.environment(), torch.enable_grad():
                r = session.run_edited(edit, sites=sites, grad=True)
                torch.autograd.grad(metric(r.logits[-1]), leaves)
        """
        if getattr(self._inside, "active", False):
            yield
            return
        with outside_request(), self.application_environment():
            self._inside.active = True
            try:
                yield
            finally:
                self._inside.active = False

    def sandbox(self, *, standins: Mapping[str, Callable[..., Any]] | None = None
                ) -> contextlib.AbstractContextManager[ExternalCallSandbox]:
        """A sandbox serving this incident's recorded external calls (application replay)."""
        return sandbox(self._calls, incident_id=self.incident.id, standins=standins)

    @contextlib.contextmanager
    def application_environment(self, *, standins: Mapping[str, Callable[..., Any]] | None = None
                                ) -> Iterator[ExternalCallSandbox]:
        """:meth:`environment` in the caller's request context, yielding the sandbox: for
        re-running the application (``rerun_episode``) under a recorder."""
        with _REPLAY_LOCK, deterministic_env(num_threads=self._threads, rng_state=self._rng,
                                             cuda=self._device.type == "cuda") as settings, \
                self.sandbox(standins=standins) as box:
            self.settings = settings
            yield box

    # ------------------------------------------------------------------ the primitive
    def run_edited(self, edit: Edit | BoundEdit | None = None, *,
                   sites: Sequence[str | BoundSite] = (), capture: Sequence[str] = (),
                   greedy: bool = False, repeat: int = 1, last_step: int | None = None,
                   grad: bool = False, plan: CallPlan | None = None,
                   evaluations: int = 0) -> ReplayResult[Never]:
        """Replay the incident's forward calls with ``edit`` called on ``sites`` (see
        :mod:`analysis.replay._edit`); the replay every other run of this session is made of.

        ``edit``: an :class:`~analysis.replay.Edit` hooked on ``sites``, or a
        :class:`~analysis.replay.BoundEdit` (an edit with its sites, as
        :meth:`EditSpec.bind_sets` makes them); ``capture``: sites whose values (after the edit)
        to return per call; ``greedy=True`` feeds each decode call the previous call's argmax;
        ``repeat``: the incident's batch replicated (row block ``r`` = copy ``r``; the edit
        sees the whole batch); ``last_step``: stop after that forward call; ``grad=True``:
        autograd on and the logits attached to the graph (run it inside :meth:`environment` to
        take the backward there); ``plan``: other forward calls made the incident's way (a
        counterfactual prompt's: ``dataclasses.replace(session.plan, steps=...)``);
        ``evaluations``: candidate sets the run evaluates (for :attr:`candidate_evaluations`).

        Example::

            r = session.run_edited(lambda site, v, *, step: v * 0, sites=["blocks.0.mlp"])
        """
        if edit is not None and not isinstance(edit, BoundEdit):
            hooked = [b for s in sites for b in (self.resolve(s) if isinstance(s, str) else [s])]
            edit = BoundEdit(sites=tuple(hooked), edit=edit)
        cap = [b for site in capture for b in self.resolve(site)]
        with self.environment(), torch.enable_grad() if grad else torch.no_grad():
            raw = replay_calls(self.model, plan if plan is not None else self.plan, bound=edit,
                               capture=cap, repeat=repeat, greedy=greedy, last_step=last_step,
                               device=self._device, keep_graph=grad)
        n = len(raw.logits)
        self._count(steps=n, rows=n * repeat, sets=evaluations, batched=repeat > 1)
        return ReplayResult(logits=raw.logits, input_ids=raw.input_ids,
                            activations=raw.activations, mode=_mode(greedy), batch_size=repeat)

    # ------------------------------------------------------------------ fidelity
    def _measure(self, *, auto_mode: bool) -> None:
        capture: list[str] = []
        notes: list[str] = []
        for s in self.incident.sites(kind="activation"):
            try:
                self.resolve(s)
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

    def _measure_with(self, plan: CallPlan, capture: list[str], notes: list[str]) -> Fidelity:
        raw = self.run_edited(capture=capture, plan=plan)
        return self._meter.measure(raw.activations, raw.logits, mode=plan.mode, sites=capture,
                                   notes=notes)

    def fidelity(self) -> Fidelity:
        """The fidelity measured by the replay made at :meth:`Replayer.load` (or run it now)."""
        if self._fidelity is None:
            self._measure(auto_mode=False)
        assert self._fidelity is not None
        return self._fidelity

    # ------------------------------------------------------------------ edit sets
    @overload
    def run(self, interventions: Sequence[S], *, capture: Sequence[str] = ...,
            greedy: bool = ..., last_step: int | None = ...) -> ReplayResult[S]: ...

    @overload
    def run(self, *, capture: Sequence[str] = ..., greedy: bool = ...,
            last_step: int | None = ...) -> ReplayResult[Never]: ...

    def run(self, interventions: Sequence[S] = (), *, capture: Sequence[str] = (),
            greedy: bool = False, last_step: int | None = None) -> ReplayResult[S]:
        """Replay with ``interventions`` (edit specifications) applied jointly (batch = the
        incident's own).

        ``capture``: sites whose values (after the interventions) to return per step;
        ``greedy=True`` feeds each step the previous step's argmax instead of the recorded token
        (a free greedy continuation of the same length); ``last_step``: stop after that forward
        call. Without interventions (and run to the end) the result carries the fidelity
        measured against the recorded logits and activations.
        """
        spec = spec_type([interventions])
        ivs = list(interventions)
        raw = self._run_sets([ivs], spec, capture=capture, greedy=greedy, last_step=last_step)
        fid = None if ivs or greedy or last_step is not None else \
            self._meter.measure_recorded(raw.activations, raw.logits, mode=self.plan.mode)
        return ReplayResult(logits=raw.logits, input_ids=raw.input_ids,
                            activations=raw.activations, interventions=tuple(ivs),
                            mode=raw.mode, batch_size=1, fidelity=fid)

    def verify(self, interventions: Sequence[S], *, capture: Sequence[str] = (),
               greedy: bool = False, last_step: int | None = None) -> ReplayResult[S]:
        """Re-run one set at the incident's own shapes (batch 1) — for final claims (DESIGN §6:
        batching changes the floating-point arithmetic). Identical to :meth:`run`."""
        return self.run(interventions, capture=capture, greedy=greedy, last_step=last_step)

    def run_batch(self, sets: Sequence[Sequence[S]], *, capture: Sequence[str] = (),
                  greedy: bool = False, max_batch: int = 64,
                  last_step: int | None = None) -> list[ReplayResult[S]]:
        """Evaluate many intervention sets, up to ``max_batch`` sets per batched forward
        (``last_step``: stop each replay after that forward call).

        The incident's inputs are replicated along the batch (row block ``i`` = set ``i``), each
        block gets its own interventions (vectorised in one hook per site). Results match
        sequential :meth:`run` up to floating-point noise (allclose, not bitwise): confirm final
        claims with :meth:`verify`.
        """
        spec = spec_type(sets)
        if max_batch < 1:
            raise ReplayError(f"max_batch must be >= 1, got {max_batch}")
        out: list[ReplayResult[S]] = []
        rows = self.plan.batch
        for i in range(0, len(sets), max_batch):
            chunk = [list(s) for s in sets[i:i + max_batch]]
            raw = self._run_sets(chunk, spec, capture=capture, greedy=greedy,
                                 last_step=last_step)
            for r, ivs in enumerate(chunk):
                block = raw.rows(r * rows, (r + 1) * rows)
                out.append(ReplayResult(logits=block.logits, input_ids=block.input_ids,
                                        activations=block.activations, interventions=tuple(ivs),
                                        mode=block.mode, batch_size=len(chunk)))
        return out

    def _run_sets(self, sets: list[list[S]], spec: type[S] | None, *, capture: Sequence[str],
                  greedy: bool, last_step: int | None = None) -> ReplayResult[Never]:
        """One replay carrying ``sets`` (row block ``r`` = set ``r``), compiled by ``spec``."""
        bound = None
        if spec is not None and any(sets):
            bound = spec.bind_sets(self, sets, batched=len(sets) > 1)
        return self.run_edited(bound, capture=capture, greedy=greedy, repeat=len(sets),
                               evaluations=len(sets), last_step=last_step)

    # ------------------------------------------------------------------ materialisation
    def materialize(self, sites: Sequence[str] | None = None, *,
                    id: str | None = None) -> Incident:
        """A new, complete incident with the activations of ``sites`` computed by this replay.

        Default sites: the recorder's configured granularity (``recorder.granularity``). Every
        row of the original is kept (recorded activations and logits win over replayed ones);
        the manifest says ``activations: "captured"``, ``materialized_from: <id>``, and
        ``replay: {fidelity, fingerprint, determinism, calls, runtime}``.
        """
        return materialize_replay(self, sites, id=id)


def _mode(greedy: bool) -> Literal["teacher_forced", "greedy"]:
    return "greedy" if greedy else "teacher_forced"


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")

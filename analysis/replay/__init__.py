"""Deterministic replay of recorded incidents (DESIGN §6), with measured fidelity.

Replay = the same weights (fingerprint checked), inputs, seeds, deterministic kernels, thread
count, and the same sequence of forward calls with the same shapes as the incident: the prefill,
then one KV-cached call per decode step teacher-forced on the recorded tokens.

It offers one primitive, :meth:`ReplaySession.run_edited`: those forward calls with an *edit*
``edit(site, value, *, step) -> replacement | None`` called on hooked sites (:class:`Edit`,
baukit's ``edit_output``). Interventions, their donors and batched plans live above it in
:mod:`analysis.interventions`, which imports this package and never the reverse: the session's
``run`` / ``run_batch`` / ``verify`` take sets of edit specifications (:class:`EditSpec`) whose
type compiles them into one edit (:class:`BoundEdit`).

Example::

    from analysis.replay import Replayer
    session = Replayer(model).load(inc)
    fid = session.fidelity()
    fid.exact, fid.max_abs_diff, fid.top1_agreement      # True, 0.0, 1.0 on CPU
    r = session.run_edited(lambda site, v, *, step: v * 0.5, sites=["blocks.1.mlp"],
                           capture=["blocks.2.resid_post"])
    complete = session.materialize(sites=["blocks.*.resid_post"])   # for activations: "replay"

An incident may be an *episode* — several model calls (an agent loop's, a conversation's turns)
and the tool calls between them (manifest ``episode``, :mod:`integrations.incident._episode`):
the forward calls replay as served (a new KV cache per fresh model call), and
:func:`rerun_episode` re-runs the application in the sandbox, tools answered from the recording
(or, for a counterfactual, by local stand-ins).
"""

from __future__ import annotations

from ._calls import CallMode, CallPlan, StepCall
from ._determinism import DeterminismSettings, deterministic_env
from ._edit import BoundEdit, Edit
from ._episode import EpisodeRun, first_difference, rerun_episode
from ._fidelity import Fidelity, TensorDiff, compare
from ._result import ReplayResult
from ._session import EditSpec, Replayer, ReplaySession

__all__ = [
    "BoundEdit",
    "CallMode",
    "CallPlan",
    "DeterminismSettings",
    "Edit",
    "EditSpec",
    "EpisodeRun",
    "Fidelity",
    "ReplayResult",
    "ReplaySession",
    "Replayer",
    "StepCall",
    "TensorDiff",
    "compare",
    "deterministic_env",
    "first_difference",
    "rerun_episode",
]

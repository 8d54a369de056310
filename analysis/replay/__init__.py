"""Deterministic replay of recorded incidents (DESIGN §6), with measured fidelity.

Replay = the same weights (fingerprint checked), inputs, seeds, deterministic kernels, thread
count, and the same sequence of forward calls with the same shapes as the incident: the prefill,
then one KV-cached call per decode step teacher-forced on the recorded tokens.

Example::

    from analysis.replay import Replayer
    session = Replayer(model).load(inc)
    fid = session.fidelity()
    fid.exact, fid.max_abs_diff, fid.top1_agreement      # True, 0.0, 1.0 on CPU
    complete = session.materialize(sites=["blocks.*.resid_post"])   # for activations: "replay"
"""

from __future__ import annotations

from ._calls import CallMode, CallPlan, StepCall
from ._determinism import DeterminismSettings, deterministic_env
from ._donors import DonorCache, resample_generator
from ._fidelity import Fidelity, TensorDiff, compare
from ._result import ReplayResult
from ._session import Replayer, ReplaySession

__all__ = [
    "CallMode",
    "CallPlan",
    "DeterminismSettings",
    "DonorCache",
    "Fidelity",
    "ReplayResult",
    "ReplaySession",
    "Replayer",
    "StepCall",
    "TensorDiff",
    "compare",
    "deterministic_env",
    "resample_generator",
]

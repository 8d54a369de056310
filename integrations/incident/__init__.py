"""The incident format: one Arrow IPC stream per incident — a tensor table plus a JSON manifest.

Writing (serving side) and reading (sidecar / analysis) share this package; nothing here uses
pickle or ``torch.load``, and every byte read is validated before use (see DESIGN §3).

Example::

    from integrations.incident import Incident, IncidentBuilder, new_manifest

    b = IncidentBuilder(manifest=new_manifest(id="inc-1"))
    b.add(kind="activation", site="blocks.0.resid_post", module_path="model.layers.0", step=0,
          tensor=h)                                     # h: [batch, pos, d_model]
    inc = Incident.from_bytes(b.to_bytes())
    inc.tensor("blocks.0.resid_post", step=0)           # exact dtype, shape and bits
"""

from __future__ import annotations

from integrations.errors import IncidentFormatError, IncidentTooLargeError, TensorNotFoundError

from ._atomic import atomic_write
from ._builder import IncidentBuilder, TensorRecord
from ._digest import DIGEST_ALGORITHM
from ._manifest import REQUIRED_KEYS, new_manifest, validate_manifest
from ._reader import Incident
from ._runtime import model_fingerprint, model_reference, runtime_info
from ._schema import DTYPE_ITEMSIZE, FORMAT_VERSION, KINDS, MANIFEST_KEY, SCHEMA

__all__ = [
    "DIGEST_ALGORITHM",
    "DTYPE_ITEMSIZE",
    "FORMAT_VERSION",
    "KINDS",
    "MANIFEST_KEY",
    "REQUIRED_KEYS",
    "SCHEMA",
    "Incident",
    "IncidentBuilder",
    "IncidentFormatError",
    "IncidentTooLargeError",
    "TensorNotFoundError",
    "TensorRecord",
    "atomic_write",
    "model_fingerprint",
    "model_reference",
    "new_manifest",
    "runtime_info",
    "validate_manifest",
]

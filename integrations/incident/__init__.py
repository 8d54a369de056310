"""The incident format: one Arrow IPC stream per incident — a tensor table plus a JSON manifest.

Writing (serving side) and reading (sidecar / analysis) share this package; nothing here uses
pickle or ``torch.load``, and every byte read is validated before use (see DESIGN §3). Names are
imported on first use, so ``TensorRecord`` or ``fsync_dir`` do not pull in
pyarrow.

Example::

    from integrations.incident import Incident, IncidentBuilder, new_manifest

    b = IncidentBuilder(manifest=new_manifest(id="inc-1"))
    b.add(kind="activation", site="blocks.0.resid_post", module_path="model.layers.0", step=0,
          tensor=h)                                     # h: [batch, pos, d_model]
    inc = Incident.from_bytes(b.to_bytes())
    inc.tensor("blocks.0.resid_post", step=0)           # exact dtype, shape and bits
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from integrations._lazy import lazy_exports
from integrations.errors import IncidentFormatError, IncidentTooLargeError, TensorNotFoundError

if TYPE_CHECKING:
    from ._atomic import atomic_write, fsync_dir
    from ._builder import IncidentBuilder
    from ._digest import DIGEST_ALGORITHM
    from ._episode import Episode, EpisodeStep
    from ._limits import DEFAULT_LIMITS, DecodeLimits
    from ._manifest import ID_PATTERN, REQUIRED_KEYS, new_manifest, validate_manifest
    from ._reader import Incident
    from ._record import TensorRecord
    from ._runtime import model_fingerprint, model_reference, runtime_info
    from ._schema import DTYPE_ITEMSIZE, FORMAT_VERSION, MANIFEST_KEY, ROW_KINDS, SCHEMA

__all__ = [
    "DEFAULT_LIMITS",
    "DIGEST_ALGORITHM",
    "DTYPE_ITEMSIZE",
    "FORMAT_VERSION",
    "ID_PATTERN",
    "MANIFEST_KEY",
    "REQUIRED_KEYS",
    "ROW_KINDS",
    "SCHEMA",
    "DecodeLimits",
    "Episode",
    "EpisodeStep",
    "Incident",
    "IncidentBuilder",
    "IncidentFormatError",
    "IncidentTooLargeError",
    "TensorNotFoundError",
    "TensorRecord",
    "atomic_write",
    "fsync_dir",
    "model_fingerprint",
    "model_reference",
    "new_manifest",
    "runtime_info",
    "validate_manifest",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    "DEFAULT_LIMITS": "._limits",
    "DIGEST_ALGORITHM": "._digest",
    "DecodeLimits": "._limits",
    "Episode": "._episode",
    "EpisodeStep": "._episode",
    "DTYPE_ITEMSIZE": "._schema",
    "FORMAT_VERSION": "._schema",
    "ID_PATTERN": "._manifest",
    "Incident": "._reader",
    "IncidentBuilder": "._builder",
    "MANIFEST_KEY": "._schema",
    "REQUIRED_KEYS": "._manifest",
    "ROW_KINDS": "._schema",
    "SCHEMA": "._schema",
    "TensorRecord": "._record",
    "atomic_write": "._atomic",
    "fsync_dir": "._atomic",
    "model_fingerprint": "._runtime",
    "model_reference": "._runtime",
    "new_manifest": "._manifest",
    "runtime_info": "._runtime",
    "validate_manifest": "._manifest",
})

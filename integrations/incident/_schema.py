"""The fixed Arrow schema of an incident's tensor table, and the tables that go with it.

Everything a writer and a reader must agree on lives here: the format version, the allowed row
kinds, the allowed tensor dtypes (by exact torch name, with their item sizes) and the schema.

Example::

    from integrations.incident._schema import SCHEMA, DTYPE_ITEMSIZE
    assert DTYPE_ITEMSIZE["bfloat16"] == 2
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from integrations.errors import IncidentFormatError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPE_ITEMSIZE",
    "FORMAT_VERSION",
    "MANIFEST_KEY",
    "ROW_KINDS",
    "SCHEMA",
    "SUPPORTED_FORMAT_VERSIONS",
    "RowMeta",
    "check_little_endian",
    "dtype_name",
    "torch_dtype",
]

#: Version of the incident format written by this code.
FORMAT_VERSION = 1
#: Versions this code can read.
SUPPORTED_FORMAT_VERSIONS = frozenset({1})

#: Schema-metadata key holding the manifest JSON.
MANIFEST_KEY = b"forensics.manifest"

#: Row kinds, in the order of the dictionary the builder writes.
ROW_KINDS: tuple[str, ...] = ("input", "output", "activation", "logits", "reference")

#: Allowed tensor dtypes (exact torch dtype names) and their item size in bytes.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}

SCHEMA = pa.schema(
    [
        pa.field("kind", pa.dictionary(pa.int8(), pa.utf8()), nullable=False),
        pa.field("site", pa.dictionary(pa.int32(), pa.utf8()), nullable=False),
        pa.field("module_path", pa.utf8(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("dtype", pa.utf8(), nullable=False),
        pa.field("shape", pa.list_(pa.field("item", pa.int32(), nullable=False)), nullable=False),
        pa.field("data", pa.large_binary(), nullable=False),
    ]
)


@dataclass(frozen=True)
class RowMeta:
    """Every column of one tensor-table row but its bytes: what a writer and a reader agree on."""

    kind: str
    site: str
    module_path: str
    step: int
    dtype: str
    shape: tuple[int, ...]


def dtype_name(dtype: torch.dtype) -> str:
    """Exact torch dtype name (``torch.float32`` -> ``"float32"``); rejects unsupported dtypes."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_ITEMSIZE:
        raise IncidentFormatError(
            f"tensor dtype {name!r} cannot be stored in an incident; allowed dtypes: "
            f"{', '.join(DTYPE_ITEMSIZE)}. Convert the tensor (e.g. .float()) before recording."
        )
    return name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an allowed dtype name (imports torch lazily)."""
    import torch

    if name not in DTYPE_ITEMSIZE:  # pragma: no cover - callers validate first
        raise IncidentFormatError(f"dtype {name!r} is not allowed in an incident")
    dt = getattr(torch, name)
    assert isinstance(dt, torch.dtype)
    return dt


def check_little_endian() -> None:
    """Incident data is little-endian raw bytes; refuse to run on a big-endian host."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise IncidentFormatError(
            "incident tensors are stored little-endian and this host is big-endian; "
            "read and write incidents on a little-endian machine"
        )

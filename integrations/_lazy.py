"""Lazy re-exports for package ``__init__`` modules: a public name is imported on first use.

A package lists its public names and the module defining each; :func:`lazy_exports` returns the
module-level ``__getattr__`` and ``__dir__`` (PEP 562) that import the defining module the
first time a name is read and cache the value in the package, so later reads are plain
attribute lookups. This keeps ``import integrations`` light: torch, pyarrow and grpc are only
imported by the names that need them.

Example::

    # integrations/exporters/__init__.py
    from typing import TYPE_CHECKING
    if TYPE_CHECKING:                                    # what type checkers see
        from ._sidecar import SidecarExporter
    __getattr__, __dir__ = lazy_exports(__name__, {"SidecarExporter": "._sidecar"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(module_name: str, mapping: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package ``module_name`` (pass ``__name__``).

    ``mapping`` maps each lazily exported name to the module that defines it under the same
    name: absolute (``"integrations.incident"``) or relative to the package (``"._sidecar"``).
    A name not in ``mapping`` raises the usual :class:`AttributeError`; ``dir()`` lists the
    package's loaded attributes and every lazy name.
    """
    targets = dict(mapping)

    def __getattr__(name: str) -> Any:
        target = targets.get(name)
        if target is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(target, package=module_name), name)
        setattr(sys.modules[module_name], name, value)  # cached: the next read is direct
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[module_name]), *targets})

    return __getattr__, __dir__

"""Root-cause analysis of one real failure: from "unusual" to "why", and a fix you could deploy.

DESIGN §14: input attribution, causal trace and decision layer, components, directions and
failure signatures, each verified by replay; :func:`investigate` runs them progressively.
"""

from __future__ import annotations

__all__: list[str] = []

"""What the analyses' result types share: their JSON form and ranks in a ranking.

Example::

    @dataclass(frozen=True)
    class Necessity(JsonRecord):
        site: str
        delta: float
    Necessity("blocks.0.mlp", 0.5).to_dict()          # {'site': 'blocks.0.mlp', 'delta': 0.5}
    rank_in([("blocks.1.mlp", 3.0), ("embed", 1.0)], "embed")   # 2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

__all__ = ["JsonRecord", "rank_in"]


class JsonRecord:
    """Base of small frozen result dataclasses: :meth:`to_dict` is their JSON-ready dict."""

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict(self)`` (DuckDB rows, gRPC, CLI)."""
        return dataclasses.asdict(cast(Any, self))


def rank_in(ranking: Sequence[tuple[str, float]], site: str) -> int | None:
    """1-based position of ``site`` in ``[(site, score), ...]`` (None when absent)."""
    for i, (s, _) in enumerate(ranking, start=1):
        if s == site:
            return i
    return None

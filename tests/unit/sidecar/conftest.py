"""Fixtures for the sidecar unit tests: real incidents (IncidentBuilder) and real stores."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from integrations.incident import IncidentBuilder, new_manifest


def build_incident(incident_id: str, *, tenant: str = "acme", n_sites: int = 2, steps: int = 1,
                   model: str = "tiny-gpt2", rule: str = "flag", reason: str = "prompt_injection",
                   seed: int = 0, created_at: str | None = None,
                   traceparent: str | None = "00-0af7651916cd43dd8448eb211c80319c-"
                                             "b7ad6b7169203331-01") -> bytes:
    """A small real incident: ``n_sites`` activation sites × ``steps`` steps of [1, 4, 8]."""
    gen = torch.Generator().manual_seed(seed)
    m = new_manifest(id=incident_id, created_at=created_at,
                     model={"name": model, "revision": None, "fingerprint": "f" * 64},
                     trigger={"rule": rule, "reason": reason, "step": 0},
                     request={"id": f"req-{incident_id}", "tenant": tenant,
                              "traceparent": traceparent},
                     runtime={"python": "3.11", "torch": torch.__version__})
    b = IncidentBuilder(manifest=m)
    for step in range(steps):
        b.add(kind="input", site="input_ids", step=step,
              tensor=torch.arange(4, dtype=torch.int64).reshape(1, 4))
        for i in range(n_sites):
            b.add(kind="activation", site=f"blocks.{i}.resid_post", module_path=f"h.{i}",
                  step=step, tensor=torch.randn(1, 4, 8, generator=gen))  # [batch, pos, d_model]
    return b.to_bytes()


@pytest.fixture
def make_incident() -> Callable[..., bytes]:
    return build_incident


@pytest.fixture
def store(tmp_path: Path) -> Iterator[object]:
    from sidecar._store import LocalStore

    s = LocalStore(tmp_path / "data")
    yield s
    s.close()

"""The fast example runs as documented (the SmolLM2 ones are exercised by the e2e tests' code
paths and run by hand: `python examples/asgi_app.py`, `python examples/hf_pipeline.py`)."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_plain_torch_example_runs(capsys):  # type: ignore[no-untyped-def]
    runpy.run_path(str(ROOT / "examples" / "plain_torch.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "torch:hidden" in out and "steps=[0]" in out

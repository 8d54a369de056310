"""Record a plain PyTorch model (no transformers) through raw ``torch:`` module paths.

Run: ``python examples/plain_torch.py`` — prints the recorded sites, steps and shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from integrations import Recorder, exporters, triggers


class TinyMLP(nn.Module):
    """A two-layer MLP classifier: ``[batch, 16] -> [batch, 3]``."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(16, 32)
        self.act = nn.ReLU()
        self.out = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(x)))


def main() -> None:
    torch.manual_seed(0)
    model = TinyMLP().eval()
    ex = exporters.InMemoryExporter()
    rec = Recorder(model, sites=["torch:hidden", "torch:act"], trigger=triggers.OnFlag(),
                   exporter=ex)
    x = torch.randn(1, 16)
    with rec.request(request_id="mlp-1") as req:
        req.flag("suspicious_input")            # flagged before the forward: capture it
        with torch.no_grad():
            y = model(x)
    rec.shutdown()
    inc = ex.incidents[-1]
    print("incident", inc.id, "prediction", int(y.argmax()))
    for site in inc.sites():
        print(f"  {site:14s} steps={inc.steps(site)} shape={tuple(inc.tensor(site).shape)}")
    assert torch.equal(inc.tensor("torch:act"), torch.relu(model.hidden(x)))


if __name__ == "__main__":
    main()

"""One tensor of an incident and where/when it was taken — what is written and what is read.

Light on purpose (no numpy, no pyarrow): the recorder's hooks build these on the serving path.

Example::

    TensorRecord("activation", "blocks.0.resid_post", "model.layers.0", 0, h)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["TensorRecord"]


@dataclass(frozen=True)
class TensorRecord:
    """One row of an incident: a tensor and where/when it was taken.

    ``kind`` is one of input | output | activation | logits | reference; ``site`` the canonical
    site string (or an input name such as ``input_ids``); ``step`` the forward-call index
    (0 = prefill). Tensors read from an incident keep their exact dtype and shape.

    Example::

        for r in inc.records():
            print(r.kind, r.site, r.step, tuple(r.tensor.shape))
    """

    kind: str
    site: str
    module_path: str
    step: int
    tensor: torch.Tensor

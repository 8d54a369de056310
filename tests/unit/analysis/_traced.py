"""One call of a model as an Incident, for the analysis tests: ``integrations.trace`` around it.

Example::

    inc = traced(model, lambda: model.generate(ids, max_new_tokens=3, do_sample=False),
                 sites=["blocks.*.mlp"], flag="prompt_injection")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import integrations
from integrations.incident import Incident


def traced(model: torch.nn.Module, call: Callable[[], Any], *, sites: Sequence[str] = (),
           flag: str | None = None, request_id: str = "r-1") -> Incident:
    """Run ``call`` (no autograd) as one traced request of ``model`` and return its incident.

    Token ids returned by ``call`` (``generate()``) become the request's output; ``flag``
    flags the request with that reason (after the call, like a post-hoc flag)."""
    with integrations.trace(model, list(sites), request_id=request_id) as t, torch.no_grad():
        out = call()
        if isinstance(out, torch.Tensor) and not out.is_floating_point():
            t.request.set_output(ids=out)
        if flag:
            t.request.flag(flag)
    return t.incident

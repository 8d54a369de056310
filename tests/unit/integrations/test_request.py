"""The request context: outside_request() detaches it so nothing inside is recorded."""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry

import integrations
from integrations import Recorder, current_request, exporters, flag, outside_request, triggers


def _ids(n: int) -> torch.Tensor:
    return torch.randint(3, 90, (1, n), generator=torch.Generator().manual_seed(n))


def _recorder(model: torch.nn.Module) -> Recorder:
    return Recorder(model, sites=["blocks.0.mlp"], trigger=triggers.Always(),
                    exporter=exporters.InMemoryExporter(), metrics_registry=CollectorRegistry())


def test_outside_request_is_not_recorded_and_restores_the_request(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _recorder(tiny_gpt2) as rec:
        with rec.request(request_id="r-1") as req, torch.no_grad():
            tiny_gpt2(_ids(4))
            with outside_request():
                assert current_request() is None
                assert flag("ignored") is False        # no request to flag in here
                tiny_gpt2(_ids(9))                     # e.g. a replay: not recorded
            assert current_request() is not None        # the request is back
            assert flag("after") is True
            tiny_gpt2(_ids(5))
            assert req.capturing
        assert rec.force_flush(timeout_s=10)
        inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
    assert inc.steps("blocks.0.mlp") == [0, 1]              # the two served forwards only
    assert [inc.tensor("blocks.0.mlp", step=s).shape[1] for s in (0, 1)] == [4, 5]
    assert inc.manifest["trigger"]["flags"] == ["after"]


def test_outside_request_also_stops_an_ambient_capture(tiny_gpt2):  # type: ignore[no-untyped-def]
    with _recorder(tiny_gpt2) as rec:
        rec.start_ambient(request_id="amb")
        with torch.no_grad():
            tiny_gpt2(_ids(4))
            with integrations.outside_request():
                tiny_gpt2(_ids(9))
        assert rec.end_ambient() is not None
        assert rec.force_flush(timeout_s=10)
        inc = rec.exporter.incidents[-1]  # type: ignore[attr-defined]
    assert inc.steps("blocks.0.mlp") == [0]
    assert inc.tensor("blocks.0.mlp", step=0).shape[1] == 4

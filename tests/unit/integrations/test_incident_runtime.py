"""Model fingerprint, runtime info, and the no-pickle guarantee of the incident package."""

from __future__ import annotations

import ast
import copy
import json
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import integrations.incident as incident_pkg
from integrations.incident import (
    Incident,
    IncidentBuilder,
    model_fingerprint,
    model_reference,
    new_manifest,
    runtime_info,
)


class _Small(torch.nn.Module):
    """A real (if small) model with parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 16)
        self.bn = torch.nn.BatchNorm1d(16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 8]
        return self.fc2(self.bn(self.fc1(x)))


def _small_model() -> _Small:
    torch.manual_seed(0)
    return _Small().eval()


def test_fingerprint_is_stable_and_sees_one_changed_weight() -> None:
    model = _small_model()
    fp = model_fingerprint(model)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert model_fingerprint(model) == fp
    assert model_fingerprint(copy.deepcopy(model)) == fp
    saved = model.fc2.weight.detach().clone()
    with torch.no_grad():
        model.fc2.weight[1, 3] = torch.nextafter(saved[1, 3], torch.tensor(float("inf")))
        assert model_fingerprint(model) != fp  # one weight, one ulp
        model.fc2.weight.copy_(saved)
    assert model_fingerprint(model) == fp
    assert model_fingerprint(_small_model()) == fp  # same seed, new process-independent object


def test_fingerprint_covers_buffers_and_dtype() -> None:
    model = _small_model()
    fp = model_fingerprint(model)
    other = copy.deepcopy(model)
    assert other.bn.running_mean is not None
    other.bn.running_mean[0] = 0.5  # a buffer, not a parameter
    assert model_fingerprint(other) != fp
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fp


@pytest.mark.slow  # builds the transformers model (~15 s on a busy 2-core box)
def test_fingerprint_of_tiny_gpt2_with_tied_weights(tiny_gpt2: torch.nn.Module) -> None:
    fp = model_fingerprint(tiny_gpt2)
    assert fp == model_fingerprint(tiny_gpt2)
    ref = model_reference(tiny_gpt2, fingerprint=fp)
    assert ref["fingerprint"] == fp and ref["class"] == "GPT2LMHeadModel"
    info = runtime_info(tiny_gpt2)
    assert info["device"] == "cpu" and info["dtype"] == "float32"


def test_runtime_info_is_measured_and_json() -> None:
    info = runtime_info()
    json.dumps(info, allow_nan=False)
    assert info["torch"] == torch.__version__
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert info["transformers"] == metadata.version("transformers")
    assert info["deterministic"] is torch.are_deterministic_algorithms_enabled()
    assert info["num_threads"] == torch.get_num_threads()
    assert set(info) >= {"python", "torch", "transformers", "device", "dtype", "deterministic",
                         "num_threads"}


def test_runtime_info_does_not_import_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes any `import transformers` raise ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)  # type: ignore[arg-type]
    info = runtime_info()
    assert info["transformers"] == metadata.version("transformers")  # read from metadata


def test_manifest_with_model_module_fills_fingerprint_and_runtime() -> None:
    model = _small_model()
    m = new_manifest(id="inc-model", model=model)
    assert m["model"]["fingerprint"] == model_fingerprint(model)
    assert m["runtime"]["dtype"] == "float32"
    inc = Incident.from_bytes(IncidentBuilder(manifest=m).to_bytes())
    assert inc.manifest["model"]["fingerprint"] == model_fingerprint(model)


_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal",
                      "joblib"}


def test_no_pickle_or_torch_load_in_the_package() -> None:
    pkg_dir = Path(incident_pkg.__file__).parent
    sources = sorted(pkg_dir.glob("*.py"))
    assert len(sources) >= 5
    for src in sources:
        tree = ast.parse(src.read_text(), filename=str(src))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
                assert not names & _FORBIDDEN_MODULES, f"{src.name}: imports {names}"
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in _FORBIDDEN_MODULES, src.name
            elif isinstance(node, ast.Attribute):
                assert node.attr not in {"load", "loads", "save"} or not (
                    isinstance(node.value, ast.Name)
                    and node.value.id in {"torch", *_FORBIDDEN_MODULES}
                ), f"{src.name}:{node.lineno}: {ast.unparse(node)}"
                assert node.attr != "allow_pickle", src.name
            elif isinstance(node, ast.keyword):
                assert node.arg != "allow_pickle", f"{src.name}:{node.lineno}"

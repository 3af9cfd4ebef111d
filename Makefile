# Two commands do all the set-up: `make demo` and `make test` (each installs first if needed).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every installed package at the version the tests passed with (lrc_ray's dependencies and
# theirs, pip and setuptools included; torch apart), so that two installs a month apart are the
# same. After changing dependencies: install them into .venv, run the tests, then `make constraints`.
CONSTRAINTS := requirements/constraints.txt
PIP_INSTALL := $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS)
# torch first, at the tested version, in the build the machine's pip finds for it (the Linux
# wheel on PyPI is the CUDA build); the Dockerfile and cluster/aws-gpu.yaml install the same one.
TORCH_VERSION := 2.13.0
# Two pytest-xdist workers: the tests that start Ray on one, the plain tests beside them (groups set
# in tests/conftest.py). PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=

.PHONY: install demo test bench constraints clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip
	$(PIP_INSTALL) torch==$(TORCH_VERSION)
	$(PIP_INSTALL) -e '.[test,dashboards]'
	touch $@

demo: install
	$(BIN)/lrc-ray demo

test: install
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/superpixels.py
	$(BIN)/python bench/loss.py
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/sweep_overhead.py

# Write the constraints from what .venv holds now (lrc_ray itself and torch, whose build differs
# between machines, left out).
constraints:
	{ echo "# The tested versions (written by \`make constraints\` on Python 3.11, Linux x86_64): used by make install and the Dockerfile"; \
	  $(BIN)/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(torch|pyflakes)=='; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .lrc_ray

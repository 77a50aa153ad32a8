# Two commands for a newcomer (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch: pip finds it in the wheel cache of our machines (/opt/wheels). Elsewhere,
# point pip at https://download.pytorch.org/whl/cpu (TORCH_INDEX=...) to avoid the CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# .ci/run adds genicam (after installing Aravis from Debian) so the camera test runs for real.
EXTRAS ?= cpu,train,plant,ui,dev

.PHONY: install demo test lint typecheck unit clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/stripinspect demo --config config.yaml --out demo_out

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) demo_out .pytest_cache .mypy_cache .ruff_cache

# Everything runs from .venv, which `make install` creates from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),/opt/wheels)
# torch's CPU build lies in FIND_LINKS; pinning the local version keeps CUDA builds out.
TORCH ?= torch==2.13.0+cpu
PYTEST_ARGS ?=

.PHONY: install serve test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python --find-links "$(FIND_LINKS)" "$(TORCH)" -e ".[test]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/kvserve serve $(ARGS)

test: install
	$(BIN)/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)

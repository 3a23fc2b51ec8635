# sdatom: the two commands a new user needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Tests and the demo run torch on one thread: small ops collapse when threads fight for 2 cores.
RUN_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install test test-fast demo lint clean

$(BIN)/sdatom: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	@touch $@

install: $(BIN)/sdatom

# The full suite (CI): slow tests included.
test: $(BIN)/sdatom
	$(RUN_ENV) $(BIN)/python -m pytest -q

# The edit loop (under 2 minutes on 2 cores): everything but the tests marked slow, in two
# single-threaded worker processes.
test-fast: $(BIN)/sdatom
	$(RUN_ENV) $(BIN)/python -m pytest -q -m 'not slow' -n 2

demo: $(BIN)/sdatom
	$(RUN_ENV) bash scripts/demo.sh

lint: $(BIN)/sdatom
	$(BIN)/ruff check sdatom tests scripts
	$(BIN)/ruff format --check sdatom tests scripts

clean:
	rm -rf runs/demo $(VENV)

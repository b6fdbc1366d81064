# `make demo` and `make test` each build .venv from pyproject.toml first, so both work on a fresh clone.
PY ?= python3
# glibc's malloc on transparent huge pages: XLA:CPU's large temporaries page-fault less (see
# README, "Single-device speed"); harmless where unsupported.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo-mole

.PHONY: demo test test-fast lint format install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The [eval] extra (lm-eval, for `launch.py eval --tasks`), installed by the targets that use it.
EVAL_STAMP := $(VENV)/.installed-eval
$(EVAL_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,eval]'
	touch $(EVAL_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo.py --workdir=$(DEMO_DIR)

test: $(EVAL_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -n 2 --dist worksteal

# The tests that neither train a run nor spawn processes (under 2 minutes on 2 cores).
test-fast: $(EVAL_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -m "not slow" -n 2 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

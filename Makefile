# `make demo` and `make test` each build .venv from the lock files in requirements/ (exact
# versions with hashes) first, so both work on a fresh clone and install the same packages on
# every machine; `make lock` refreshes the lock files from pyproject.toml.
PY ?= python3
# glibc's malloc on transparent huge pages: XLA:CPU's large temporaries page-fault less (see
# docs/benchmarks.md, "Single-device speed"); harmless where unsupported.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
VENV := .venv
BIN := $(VENV)/bin
# pip installs only uv (pinned with its hashes; -qq: pip's errors, not the warnings about this
# machine's package-index settings); uv installs the lock files, hashes checked.
PIP := $(BIN)/python -m pip -qq --disable-pip-version-check
UV := $(BIN)/uv pip install -q --python $(BIN)/python --require-hashes -r
LOCK := $(BIN)/uv pip compile --generate-hashes --python-version 3.11 -q
DEMO_DIR ?= runs/demo-mole
PYTEST := $(BIN)/python -m pytest tests -n 2 --dist worksteal

.PHONY: demo test test-fast docs lint format install lock clean

# The project itself is importable from .venv through a .pth file naming this folder (what an
# editable install does, without building the package).
$(VENV)/.venv: requirements/uv.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --require-hashes -r requirements/uv.txt
	$(BIN)/python -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'mole_jax.pth'), 'w').write(os.getcwd() + '\n')"
	touch $@

# One stamp per lock file: the runtime (demo), + dev tools, + lm-eval (the tests use both).
$(VENV)/.base: requirements/base.txt $(VENV)/.venv
	$(UV) requirements/base.txt
	touch $@
$(VENV)/.dev: requirements/dev.txt $(VENV)/.venv
	$(UV) requirements/dev.txt
	touch $@
$(VENV)/.eval: requirements/eval.txt $(VENV)/.venv
	$(UV) requirements/eval.txt
	touch $@

install: $(VENV)/.dev

demo: $(VENV)/.base
	$(BIN)/python experiments/demo.py --workdir=$(DEMO_DIR)

test: $(VENV)/.eval
	$(BIN)/ruff check .
	$(PYTEST)

# The tests that neither train a run nor spawn processes.
test-fast: $(VENV)/.eval
	$(BIN)/ruff check .
	$(PYTEST) -m "not slow"

# Every measured table in README.md and docs/*.md, written anew from experiments/results/.
docs: $(VENV)/.dev
	$(BIN)/python experiments/make_docs.py

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lock: $(VENV)/.venv
	$(LOCK) requirements/uv.in -o requirements/uv.txt
	$(LOCK) pyproject.toml -o requirements/base.txt
	$(LOCK) pyproject.toml --extra dev -o requirements/dev.txt
	$(LOCK) pyproject.toml --extra dev --extra eval -o requirements/eval.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

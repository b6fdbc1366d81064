# `make demo` and `make test` each build their virtual environments from the lock files in
# requirements/ (exact versions with hashes) first, so both work on a fresh clone and install the
# same packages on every machine with Python 3.11 (what the locks are resolved for); `make lock`
# refreshes the lock files from pyproject.toml.
PY ?= python3
# glibc's malloc on transparent huge pages: XLA:CPU's large temporaries page-fault less (see
# docs/benchmarks.md, "Single-device speed"); harmless where unsupported.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
VENV := .venv
BIN := $(VENV)/bin
# The TPU and GPU compilers of `launch.py compile` ([tpu] and [gpu-aot] extras) live in a venv of
# their own: the CUDA plugin logs at every `import jax` on a host without a GPU.
AOT := .venv-aot
# pip installs only uv (pinned with its hashes; -qq: pip's errors, not the warnings about this
# machine's package-index settings); uv installs the lock files, hashes checked.
PIP = $(1)/bin/python -m pip -qq --disable-pip-version-check
UV = $(1)/bin/uv pip install -q --python $(1)/bin/python --require-hashes -r
LOCK := $(BIN)/uv pip compile --generate-hashes --python-version 3.11 -q
DEMO_DIR ?= runs/demo-mole
PYTEST := $(BIN)/python -m pytest tests -n 2 --dist worksteal

.PHONY: demo test test-fast docs lint format install aot lock clean

# A venv with uv, and the project importable through a .pth file naming this folder (what an
# editable install does, without building the package).
%/.venv: requirements/uv.txt
	test -x $*/bin/python || $(PY) -m venv $*
	$(call PIP,$*) install --require-hashes -r requirements/uv.txt
	$*/bin/python -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'mole_jax.pth'), 'w').write(os.getcwd() + '\n')"
	touch $@

# One stamp per lock file: the runtime (demo); + dev tools; + lm-eval (the tests); the compilers.
$(VENV)/.base: requirements/base.txt $(VENV)/.venv
	$(call UV,$(VENV)) requirements/base.txt
	touch $@
$(VENV)/.dev: requirements/dev.txt $(VENV)/.venv
	$(call UV,$(VENV)) requirements/dev.txt
	touch $@
$(VENV)/.test: requirements/test.txt $(VENV)/.venv
	$(call UV,$(VENV)) requirements/test.txt
	touch $@
$(AOT)/.aot: requirements/aot.txt $(AOT)/.venv
	$(call UV,$(AOT)) requirements/aot.txt
	touch $@

install: $(VENV)/.dev

aot: $(AOT)/.aot

demo: $(VENV)/.base
	$(BIN)/python experiments/demo.py --workdir=$(DEMO_DIR)

test: $(VENV)/.test $(AOT)/.aot
	$(BIN)/ruff check .
	$(PYTEST)

# The tests that neither train a run nor spawn processes (1 min 12 s on 2 cores, warm:
# docs/development.md, "Latest test run").
test-fast: $(VENV)/.test
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
	$(LOCK) pyproject.toml --extra dev --extra eval --extra remote -o requirements/test.txt
	$(LOCK) pyproject.toml --extra tpu --extra gpu-aot -o requirements/aot.txt

clean:
	rm -rf $(VENV) $(AOT) runs .pytest_cache .ruff_cache

# The two-command quickstart: `make demo` and `make test`. Both create .venv on
# first use (python3 -m venv), install the project into it, and reuse it after.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test check lint typecheck unit bench test-minimum clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/blindhub demo --out demo-output

# The whole suite, real calls included: what CI runs.
test: lint typecheck unit

# The inner loop: lint, types and every test not marked slow (no real call).
check: lint typecheck
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

# Each benchmark compares against a baseline run in the same process; see docs/.
bench: $(STAMP)
	$(BIN)/python -m tests.bench.sframe
	$(BIN)/python -m tests.bench.handshake
	$(BIN)/python -m tests.bench.call
	$(BIN)/python -m tests.bench.hub
	$(BIN)/python -m tests.bench.audio_sizes
	$(BIN)/python -m tests.bench.group

# The suite against the oldest dependency versions pyproject.toml allows.
MINIMUM_VENV := .venv-minimum
test-minimum:
	test -x $(MINIMUM_VENV)/bin/python || $(PYTHON) -m venv $(MINIMUM_VENV)
	$(MINIMUM_VENV)/bin/python -m pip install --quiet -e '.[test,demo]' aiortc==1.16.0 av==14.0.1 \
		cryptography==44.0.0 matplotlib==3.11.2 msgspec==0.23.0 pillow==13.0.0 pynacl==1.5.0 redis==8.1.0 uvloop==0.23.0 websockets==16.0
	$(MINIMUM_VENV)/bin/pytest

clean:
	rm -rf $(VENV) $(MINIMUM_VENV) demo-output .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		.import_linter_cache

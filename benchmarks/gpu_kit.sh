#!/usr/bin/env bash
# Issue 6's GPU rows on a lent machine that reaches no network (the `device` tool's H100 / H200).
#
#   bash benchmarks/gpu_kit.sh prepare   # here: fills .device/ (git-ignored, never committed)
#   bash benchmarks/gpu_kit.sh run       # there, with `.device` carried; writes into $OUT
#
# prepare: wheels (CPython 3.12) for the packages the device image lacks (grain and its array-record and
# portpicker, ml-collections, tensorboardX) plus flax 0.12.12: the image has jax 0.11.2, under which flax 0.12.8
# and 0.12.9 fail to import (jax.experimental.hijax lost HiPrimitive) and 0.12.10+ import (they need jax >= 0.11.1;
# the test suite, torch tests aside, passes on CPU under jax 0.11.2 + flax 0.12.12 + numpy 2.5.2 in a
# Python 3.12 venv, the image's versions: `make compat`); the SmolLM2 tokenizer; TALLRec's movie files (licensed
# data: they stay in the ignored folder). The GGUF (94 MiB) exceeds what a call carries, so the run uses random
# weights of SmolLM2's shape (speed does not depend on the values; both systems load the same random checkpoint,
# so their P(Yes) still agree).
# run: bf16 comparison with transformers + PEFT, the LLaMA-7B shape (int8 + LoRA, 8x512: peak memory, MFU),
# and the compiled memory plans; everything lands in $OUT, to be copied into benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.device
case "${1:-}" in
  prepare)
    data="${CLCLM_DATA:-$(cd .. && pwd)/shared/data}"
    mkdir -p "$KIT/whl" "$KIT/data/tallrec" "$KIT/cache"
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$KIT/whl" grain==0.2.18 array-record==0.8.6 portpicker ml-collections==1.1.0 tensorboardX==2.6.5 \
      flax==0.12.12
    python -c "from clclm_jax.train import loop; loop.smollm2_tokenizer()"
    rm -rf "$KIT/cache/smollm2-tokenizer"
    cp -r "${CLCLM_CACHE:-$HOME/.cache/clclm_jax}/smollm2-tokenizer" "$KIT/cache/"
    rm -rf "$KIT/data/tallrec/movie"
    cp -r "$data/tallrec/movie" "$KIT/data/tallrec/"
    du -sh "$KIT"
    ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$KIT"/whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" CLCLM_DATA="$PWD/$KIT/data" CLCLM_CACHE="$PWD/$KIT/cache"
    export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
    python3 -c "import jax, flax, optax, orbax.checkpoint, grain, torch, transformers, peft; from flax import nnx
print('versions:', *(f'{m.__name__} {m.__version__}' for m in (jax, flax, optax, torch, transformers, peft)))
print('devices:', jax.devices())" 2>&1 | tee "$OUT/versions.txt"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 benchmarks/throughput.py --out="$OUT" --gpu --model=smollm2-135m-random 2>&1 | tee "$OUT/throughput.log"
    python3 benchmarks/memory_plan.py --out="$OUT" 2>&1 | tee "$OUT/memory_plan.log"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_kit.sh prepare|run" >&2
    exit 2
    ;;
esac

"""Forward throughput of SmolLM2-135M on this machine: clclm-jax (float32, int8) vs transformers float32.

Same GGUF weights and the same 4 x 256 real TALLRec tokens for everyone; ours is one jitted call
returning float32 logits, theirs `model(ids).logits` under `torch.inference_mode`. Timed in
alternation after warm-up (compilation excluded); the median is reported. Also reports model bytes.

  python benchmarks/forward.py --out=benchmarks/results/forward.json
"""

import argparse
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.data import paths  # pylint: disable=wrong-import-position
from clclm_jax.data.prompts import template  # pylint: disable=wrong-import-position
from clclm_jax.model import loading, quant  # pylint: disable=wrong-import-position
from clclm_jax.model.config import presets  # pylint: disable=wrong-import-position
from clclm_jax.model.llama import Llama  # pylint: disable=wrong-import-position


def real_tokens(tokenizer, batch: int, length: int) -> np.ndarray:
  """`[batch, length]` ids cut from concatenated TALLRec movie test prompts."""
  records = json.loads(paths.data_path("tallrec", "movie", "test.json").read_text())
  ids = []
  for r in records:
    ids += tokenizer(template("alpaca").prompt(r["instruction"], r["input"]) + r["output"])["input_ids"]
    if len(ids) >= batch * length:
      break
  return np.asarray(ids[:batch * length], np.int32).reshape(batch, length)


def memory_table() -> dict[str, int]:
  """Bytes of every SmolLM2 variable, built abstractly, for each storage choice."""
  cfg = presets["smollm2-135m"]
  choices = {"float32": (jnp.float32, None), "bfloat16": (jnp.bfloat16, None),
             "int8 (float32 embeddings)": (jnp.float32, "int8"),
             "int8 (bfloat16 embeddings)": (jnp.bfloat16, "int8")}
  return {name: quant.model_bytes(nnx.eval_shape(lambda d=d, q=q: Llama(cfg, dtype=d, quantize=q, rngs=nnx.Rngs(0))))
          for name, (d, q) in choices.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results/forward.json")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  source = loading.smollm2_gguf()
  model32, tokenizer = loading.load_model(source)
  model8, _ = loading.load_model(source, quantize="int8")
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      source.parent, gguf_file=source.name, dtype=torch.float32).eval()
  tokens = real_tokens(tokenizer, args.batch, args.length)
  tokens_j, tokens_t = jnp.asarray(tokens), torch.from_numpy(tokens.astype(np.int64))

  forward = nnx.jit(lambda model, t: model(t))

  def theirs():
    with torch.inference_mode():
      return hf(tokens_t).logits

  fns = {
      "clclm-jax float32": lambda: forward(model32, tokens_j).block_until_ready(),
      "clclm-jax int8 weights, float32 compute": lambda: forward(model8, tokens_j).block_until_ready(),
      "transformers float32": theirs,
  }
  diff = float(np.abs(np.asarray(forward(model32, tokens_j)) - theirs().numpy()).max())
  times = common.interleaved_times(fns, repeats=args.repeats, warmup=1)
  n_tokens = args.batch * args.length
  results = {name: dict(common.summarize(t), tokens_per_s=n_tokens / common.summarize(t)["median_s"])
             for name, t in times.items()}
  base = results["transformers float32"]["tokens_per_s"]
  memory = memory_table()
  report = {"machine": common.machine(), "loadavg": common.loadavg(), "torch_threads": torch.get_num_threads(),
            "batch": args.batch, "length": args.length, "repeats": args.repeats,
            "max_abs_logit_diff_float32_vs_transformers": diff, "forward": results, "model_bytes": memory}
  common.write_json(args.out, report)

  rows = [(name, f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / base:.2f}x")
          for name, r in results.items()]
  print(f"SmolLM2-135M forward, batch {args.batch} x {args.length}, median of {args.repeats}; "
        f"{common.machine_line(report['machine'])}; load {report['loadavg']}\n")
  print(common.markdown_table(["system", "median s", "tokens/s", "vs transformers"], rows))
  print(f"\nmax |logits ours float32 - transformers| = {diff:.2e}\n")
  print(common.markdown_table(["storage", "MiB"], [(k, f"{v / 2**20:.1f}") for k, v in memory.items()]))


if __name__ == "__main__":
  main()

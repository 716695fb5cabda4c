"""Scoring time of a residual fused model (issue 51) with the text-only prompts' base logits cached
(`Recipe.base_logits`, passed with the batches as `base_logit`) against recomputing the LoRA-off pass in every
scoring, on `--n` validation prompts of the config's model; timed interleaved after a warm-up (compiles excluded),
with the one-off cost of computing the base logits and the largest P(Yes) difference between the two paths
(LoRA at zero: both are the encoder). Wall and CPU seconds (all threads) are reported.

  python benchmarks/residual_cache.py --config configs/movie.py --n 64 --repeats 3
"""

import argparse
import json
import runpy
import sys
import time

import numpy as np

from clclm_jax.contrastive import recipe
from clclm_jax.data import fused as fused_data
from clclm_jax.train import cli

sys.path.insert(0, "benchmarks")
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/movie.py")
  parser.add_argument("--n", type=int, default=64, help="validation prompts scored")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  cli.enable_compilation_cache()
  config = runpy.run_path(args.config)["get_config"]()
  r = recipe.build(config)
  if not r.cached_base(r.answer_spec):
    raise SystemExit(f"{args.config}: not residual fusion on text-only prompts; nothing is cached")
  xs = r.splits.valid[:args.n]
  t0 = time.perf_counter()
  base = r.base_logits(xs)  # compiles the base step too: an upper bound on the one-off cost
  base_s = time.perf_counter() - t0
  c = config
  batches = {name: list(fused_data.eval_batches(
      xs, r.splits.catalogue, r.tokenizer, r.text, batch_size=c.train.eval_batch_size, pad_multiple=c.data.pad_multiple,
      max_widths=c.data.eval_widths, base_logits=logits)) for name, logits in (("cached", base), ("recomputed", None))}
  scores, cpu = {}, {name: [] for name in batches}

  def scoring(name):
    def run():
      t = time.process_time()  # CPU seconds of every thread: less skewed than wall time by other jobs' load
      scores[name] = r.scorer(r.model, batches[name], desc=name).p_yes
      cpu[name].append(time.process_time() - t)
    return run

  load = common.loadavg()
  times = common.interleaved_times({name: scoring(name) for name in batches}, repeats=args.repeats)
  result = {"command": "python benchmarks/residual_cache.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "cpu": common.cpu_model(), "loadavg_before": load, "loadavg_after": common.loadavg(), "prompts": len(xs),
            "base_logits_once_s": base_s, **{f"{k}_scoring": common.summarize(v) for k, v in times.items()},
            **{f"{k}_scoring_cpu_s": v[1:] for k, v in cpu.items()},  # the timed calls (after the warm-up)
            "speedup": float(np.median(times["recomputed"]) / np.median(times["cached"])),
            "cpu_speedup": float(np.median(cpu["recomputed"][1:]) / np.median(cpu["cached"][1:])),
            "max_p_yes_difference": float(np.abs(scores["cached"] - scores["recomputed"]).max())}
  print(json.dumps(result, indent=2))
  return result


if __name__ == "__main__":
  main()

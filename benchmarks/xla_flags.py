"""Our LoRA train step and Yes/No scoring (throughput.py's work, ours in float32 only) under XLA:CPU flag
variants, each in a fresh process (XLA reads its flags once). The default runs first and last, so drift in
the host's load shows. About 2 minutes per variant on a 2-core CPU.

  python benchmarks/xla_flags.py --out=benchmarks/results --tag cpu_epyc
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
from typing import Any

import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = {
    "default": "",
    "oneDNN dot fusions": "--xla_cpu_experimental_onednn_fusion_type=dot",
    "oneDNN dot, eltwise, reduce fusions": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "YNNPACK dot, eltwise, reduce fusions": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "YNNPACK individual dots": "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    "XNNPACK greedy graph fusion": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results", help="folder for xla_flags_<tag>.{json,md}")
  p.add_argument("--tag", default="cpu")
  p.add_argument("--repeats", type=int, default=3, help="timed calls of each task per variant (median)")
  p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def child(repeats: int) -> dict[str, list[float]]:
  """Seconds per call of our float32 train step and scoring pass, in this process's XLA flags."""
  import throughput  # pylint: disable=g-import-not-at-top
  from clclm_jax.data import tokenize  # pylint: disable=g-import-not-at-top
  from clclm_jax.model import loading  # pylint: disable=g-import-not-at-top
  from clclm_jax.train import sharding  # pylint: disable=g-import-not-at-top

  model, tokenizer = loading.load_model(loading.smollm2_gguf(), dtype="float32", quantize="int8", lora=throughput.LORA)
  mesh = sharding.make_mesh((-1, 1, 1))
  train_np, batches = throughput.work_inputs(tokenizer, throughput.parse_args([]))
  fns = {"train": throughput.ours_train_fn(model, train_np, throughput.optim_config(), mesh),
         "score": throughput.ours_score_fn(model, batches, tokenize.answer_token_ids(tokenizer), mesh)}
  return common.interleaved_times(fns, repeats=repeats, warmup=1)


def run_variant(flags: str, repeats: int) -> dict[str, Any]:
  env = {**os.environ, "XLA_FLAGS": " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags]))}
  proc = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats)], env=env,
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    return {"flags": flags, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
  times = json.loads(proc.stdout.strip().splitlines()[-1])
  return {"flags": flags, **{task: {"median_s": statistics.median(ts), "times_s": ts} for task, ts in times.items()}}


def markdown(result: dict[str, Any]) -> str:
  base = result["runs"][0]
  rows = []
  for r in result["runs"]:
    cells = [f"{r['name']}", f"`{r['flags']}`" if r["flags"] else "-"]
    if "error" in r:
      rows.append(cells + ["failed: " + r["error"][:80], "", "", ""])
      continue
    for task in ("train", "score"):
      cells += [f"{r[task]['median_s']:.2f} s", f"{base[task]['median_s'] / r[task]['median_s']:.2f}x"]
    rows.append(cells)
  return "\n".join([
      f"# XLA:CPU flags and our speed ({result['tag']})", "",
      f"Machine: {common.machine_line(result['machine'])}. Load average before / after: "
      f"{result['loadavg_before']} / {result['loadavg_after']}. Command: "
      f"`{shlex.join(['python', 'benchmarks/xla_flags.py', *result['argv']])}`.",
      "SmolLM2-135M-Instruct, int8 base + float32 LoRA, float32 compute; train: one 4x256 LoRA step; score: 32 "
      "movie test prompts in batches of 8; medians of the timed calls, each variant in a fresh process; "
      "speed-up against the first (default) row.", "",
      common.markdown_table(["variant", "XLA_FLAGS", "train step", "vs default", "scoring", "vs default"], rows), ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.child:
    print(json.dumps(child(args.repeats)))
    return {}
  result = {"tag": args.tag, "argv": sys.argv[1:] if argv is None else argv, "machine": common.machine(),
            "loadavg_before": common.loadavg(), "runs": []}
  names = ["default"] + [v for v in args.variants if v != "default"] + ["default"]
  for i, name in enumerate(tqdm.tqdm(names, desc="xla flags", unit="variant")):
    label = "default (first)" if i == 0 else "default (last)" if i == len(names) - 1 else name
    result["runs"].append({"name": label, **run_variant(VARIANTS[name], args.repeats)})
  result["loadavg_after"] = common.loadavg()
  common.write_result(args.out, f"xla_flags_{args.tag}", result, markdown(result))
  return result


if __name__ == "__main__":
  main()

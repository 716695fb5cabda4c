"""Where our time goes: one traced LoRA train step and one scoring pass, time grouped by XLA operation.

  python benchmarks/profile_ours.py --out=benchmarks/results

Same model, batch and prompts as `throughput.py`. Each fused XLA kernel in the trace is mapped back,
through the compiled HLO's metadata, to the JAX operation it came from (e.g. a projection's forward
`dot_general`, its backward `transpose(...)`, attention's einsums) and to a kind: matrix multiply
(`ynn_fusion`/`dot`) or the rest (element-wise, copies, reductions).
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.data import tokenize  # pylint: disable=wrong-import-position
from clclm_jax.model import loading  # pylint: disable=wrong-import-position
from clclm_jax.train import evaluate, sharding, state as state_lib, step as step_lib  # pylint: disable=wrong-import-position

_FUSION = re.compile(r"%([\w.\-]+) = [^\n]*?(?:fusion|dot)\([^\n]*?op_name=\"([^\"]+)\"")


def op_names(hlo_text: str) -> dict[str, str]:
  """Kernel name -> the JAX operation it came from, without the jit / loop scaffolding."""
  out = {}
  for m in _FUSION.finditer(hlo_text):
    out[m.group(1)] = re.sub(r"^jit\([^)]*\)/|while/body/|closed_call/|jit\(\w+\)/", "", m.group(2))
  return out


def kind(kernel: str, op: str) -> str:
  if kernel.startswith(("ynn_fusion", "dot", "xnn_fusion")) and "dot_general" in op:
    return "matmul"
  return "other"


def traced_breakdown(fn: Callable[[], Any], hlo_text: str, trace_dir: str) -> dict[str, Any]:
  """Runs `fn` once under the profiler; milliseconds per (kind, operation), largest first."""
  jax.profiler.start_trace(trace_dir)
  fn()
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
  names = op_names(hlo_text)
  per_op, total = collections.Counter(), 0.0
  for e in json.load(gzip.open(path))["traceEvents"]:
    if e.get("ph") == "X" and e["name"] in names:
      per_op[(kind(e["name"], names[e["name"]]), names[e["name"]])] += e["dur"] / 1e3
      total += e["dur"] / 1e3
  by_kind = collections.Counter()
  for (k, _), ms in per_op.items():
    by_kind[k] += ms
  return {"kernel_ms": total, "by_kind_ms": dict(by_kind),
          "top": [{"kind": k, "op": op, "ms": ms} for (k, op), ms in per_op.most_common(15)]}


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--tag", default="cpu", help="output name suffix: profile_<tag>.{json,md}")
  args = p.parse_args(argv)
  mesh = sharding.make_mesh((-1, 1, 1))
  model, tok = loading.load_model(loading.SMOLLM2, dtype=args.dtype, quantize="int8", lora=throughput.LORA)
  optim = ConfigDict(dict(lr=1e-4, warmup_steps=0, total_steps=100, schedule="constant", max_grad_norm=1.0,
                          b1=0.9, b2=0.999, weight_decay=0.0))
  train_np, batches = throughput.work_inputs(tok, throughput.parse_args([]))
  graphdef, params, frozen = state_lib.split_model(model)
  tx = state_lib.make_optimizer(optim)
  state = state_lib.init_state(params, tx, seed=0, mesh=mesh)
  batch = sharding.global_batch(train_np, mesh)
  params_sh, frozen_sh = sharding.state_sharding(params, mesh), sharding.state_sharding(frozen, mesh)
  step = step_lib.jit_train_step(graphdef, frozen_sh, tx, state_lib.state_shardings(params, tx, mesh), mesh,
                                 loss_weights={"lm": 1.0})
  eval_step = evaluate.compile_eval_step(graphdef, params_sh, frozen_sh, mesh, *tokenize.answer_token_ids(tok))
  params_d, frozen_d = sharding.put(params, params_sh), sharding.put(frozen, frozen_sh)
  result = {"machine": common.machine(), "loadavg_before": common.loadavg(), "dtype": args.dtype, "tag": args.tag}
  with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as tmp:
    train_hlo = step.lower(state, batch, frozen_d).compile().as_text()
    holder = {"state": state}

    def train_once():
      holder["state"], metrics = step(holder["state"], batch, frozen_d)
      return float(metrics["loss"])

    for _ in range(2):
      train_once()
    result["train"] = traced_breakdown(train_once, train_hlo, f"{tmp}/train")
    prefix = evaluate.shared_prefix(batches)
    kv = eval_step.prefix(params_d, frozen_d, prefix)
    same = [sharding.global_batch(evaluate.strip_prefix(b, prefix.size), mesh) for b in batches
            if b["tokens"].shape == batches[0]["tokens"].shape]  # one executable, so kernel names are unique
    score_hlo = eval_step.batch.lower(params_d, frozen_d, same[0], kv).compile().as_text()
    score_once = lambda: [np.asarray(eval_step.batch(params_d, frozen_d, b, kv)[0]) for b in same]  # noqa: E731
    score_once()
    result["score"] = traced_breakdown(score_once, score_hlo, f"{tmp}/score")
    result["score"]["prompts"] = int(sum((b["index"] >= 0).sum() for b in batches
                                         if b["tokens"].shape == batches[0]["tokens"].shape))
  result["loadavg_after"] = common.loadavg()
  common.write_result(args.out, f"profile_{args.tag}", result, markdown(result))
  return result


def markdown(r: dict[str, Any]) -> str:
  lines = ["# Where clclm-jax's time goes (one traced step, XLA kernels)", "",
           f"Machine: {common.machine_line(r['machine'])}; load average before / after {r['loadavg_before']} / "
           f"{r['loadavg_after']}; compute {r['dtype']}, int8 base, LoRA r=8 on q, v. Command: "
           f"`python benchmarks/profile_ours.py --out=benchmarks/results --dtype {r['dtype']} --tag {r.get('tag', 'cpu')}`. Milliseconds are "
           "summed over kernels, which run in parallel on the cores, so they can exceed wall time; the shares "
           "are what to read.", ""]
  for task, what in (("train", "LoRA train step, 4x256 tokens"), ("score", "Yes/No scoring of movie prompts (after the shared prefix)")):
    d = r[task]
    share = {k: 100 * v / d["kernel_ms"] for k, v in d["by_kind_ms"].items()}
    lines += [f"## {what}: {d['kernel_ms']:.0f} ms in kernels; matmuls {share.get('matmul', 0):.0f}%, "
              f"other (element-wise, copies, reductions) {share.get('other', 0):.0f}%", "",
              common.markdown_table(["kind", "JAX operation", "ms", "share"],
                                    [[t["kind"], f"`{t['op'][:80]}`", f"{t['ms']:.0f}",
                                      f"{100 * t['ms'] / d['kernel_ms']:.1f}%"] for t in d["top"]]), ""]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()

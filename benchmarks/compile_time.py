"""Compile time of the LoRA train step and the Yes/No scoring step: decoder layers unrolled vs under `scan`.

  python benchmarks/compile_time.py --out=benchmarks/results               # compile times (minutes)
  python benchmarks/compile_time.py --out=benchmarks/results --step-time   # also steady-state step times

Compile time = wall seconds of `jax.jit(step).lower(...).compile()` of a fresh jit (no persistent cache),
for (a) the SmolLM2-135M shape (int8 base, bfloat16 compute, LoRA r=8 on q_proj/v_proj, batch 8 x 256;
random weights: shapes alone decide compile time) with layers unrolled and scanned, and (b) a 2-layer and a
32-layer model of the same width, scanned. Each number is the median of `--repeats` compiles. The train
step is self-contained (lm loss through `token_nll`, AdamW), so it measures the model, not `train/step.py`.
With `--step-time` it also times the compiled train and scoring steps (median of `--step-repeats`, run in
alternation after one warm-up call): unrolled, scan, and scan with `jax.nn.dot_product_attention` (XLA)
instead of the custom-VJP `attend`, so the scanned step can be checked to be no slower than the unrolled one and
the CPU attention default chosen by measurement.
"""

import argparse
import dataclasses
import functools
import importlib.machinery
import importlib.util
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.model.config import LlamaConfig, LoraConfig, presets  # pylint: disable=wrong-import-position
from clclm_jax.model.llama import Llama  # pylint: disable=wrong-import-position
from clclm_jax.model.lora import add_lora  # pylint: disable=wrong-import-position

LORA = LoraConfig(r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))
GOALS = {"scan_speedup": 3.0, "depth_ratio": 1.5}  # unrolled / scan compile (SmolLM2); 32-layer / 2-layer (scan)
YES_NO = (7, 8)  # any two token ids: compile and step time do not depend on which


def build_model(cfg: LlamaConfig, *, scan_layers: bool, attention_impl: str | None = None, abstract: bool,
                llama_cls=Llama) -> Llama:
  """A bfloat16, int8-base `Llama` (or `llama_cls`, e.g. an earlier version's) with LoRA (shapes only when
  `abstract`)."""
  def build():
    model = llama_cls(cfg, dtype=jnp.bfloat16, quantize="int8", rngs=nnx.Rngs(0))
    model.scan_layers = scan_layers
    if attention_impl is not None:
      model.attention_impl = attention_impl
    return add_lora(model, LORA, jax.random.key(0))
  return nnx.eval_shape(build) if abstract else build()


def batch_arrays(b: int, t: int, vocab: int) -> dict[str, jax.Array]:
  """Full rows of random tokens (no padding); the answer row is the last position."""
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, vocab, jnp.int32)
  return {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
          "attention_mask": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t), jnp.int32),
          "answer_index": jnp.full((b,), t - 1, jnp.int32)}


def train_step(graphdef, tx):
  """`(params, opt_state, frozen, batch, key) -> (params, opt_state, loss)`: the LoRA lm-loss step."""
  def step(params, opt_state, frozen, batch, key):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, frozen)
      h_btd = model.hidden_states(batch["tokens"], batch["positions"], batch["attention_mask"], dropout_key=key)
      d = h_btd.shape[-1]
      nll_n = model.token_nll(h_btd[:, :-1].reshape(-1, d), batch["tokens"][:, 1:].reshape(-1))
      w_n = batch["loss_mask"][:, 1:].reshape(-1).astype(jnp.float32)
      return jnp.sum(nll_n * w_n) / jnp.maximum(jnp.sum(w_n), 1.0)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def score_step(graphdef):
  """`(params, frozen, batch) -> P(yes)` from the answer row only (`rows_b`), as `train/evaluate.py` scores."""
  def step(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    h_bd = model.hidden_states(batch["tokens"], batch["positions"], batch["attention_mask"],
                               rows_b=batch["answer_index"])
    logits_b2 = model.lm_logits(h_bd)[:, jnp.asarray(YES_NO)]
    return jax.nn.softmax(logits_b2, axis=-1)[:, 0]
  return step


def steps(model: Llama, b: int, t: int) -> dict[str, tuple[Callable, tuple]]:
  """{"train" | "score": (function, arguments)} for a model (abstract or real)."""
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-4)
  opt_state = jax.eval_shape(tx.init, params) if _abstract(params) else tx.init(params)
  batch = batch_arrays(b, t, model.config.vocab_size)
  key = jax.random.key(2)
  return {"train": (train_step(graphdef, tx), (params, opt_state, frozen, batch, key)),
          "score": (score_step(graphdef), (params, frozen, batch))}


def baseline_llama(path: str):
  """The `Llama` class of another copy of `llama.py` (e.g. `git show HEAD~1:clclm_jax/model/llama.py`), for
  timing the code before a change in the same process (its imports resolve to this checkout's package)."""
  loader = importlib.machinery.SourceFileLoader("baseline_llama", str(path))  # any name, e.g. /dev/fd/63
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
  loader.exec_module(module)
  return module.Llama


def _abstract(tree) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def compile_seconds(fn: Callable, args: tuple) -> float:
  """Wall seconds to lower and compile a fresh jit of `fn` (a new function object: no in-memory cache hit). It
  keeps `fn`'s name, so its program is `jax.jit(fn)`'s: where a persistent cache is on (the tests'), the step
  times' compiles of the same steps find it there."""
  fresh = jax.jit(functools.wraps(fn)(lambda *a: fn(*a)))
  start = time.perf_counter()
  fresh.lower(*args).compile()
  return time.perf_counter() - start


def measure_compiles(cases: list[dict[str, Any]], repeats: int) -> list[dict[str, Any]]:
  """Median compile seconds of each case's train and scoring step, repetitions interleaved across cases."""
  work = []
  for case in cases:
    cfg = dataclasses.replace(presets[case["preset"]], num_hidden_layers=case["layers"])
    model = build_model(cfg, scan_layers=case["scan"], attention_impl=case.get("attention"), abstract=True,
                        llama_cls=case.get("llama_cls", Llama))
    for name, (fn, args) in steps(model, case["batch"], case["length"]).items():
      if name in case["steps"]:
        work.append((case, name, fn, args, []))
  for r in range(repeats):
    for case, name, fn, args, times in work:
      times.append(compile_seconds(fn, args))
      print(f"repeat {r}: {case['label']} {name}: {times[-1]:.1f} s", flush=True)
  out = []
  for case, name, _, _, times in work:
    case = {k: v for k, v in case.items() if k != "llama_cls"}
    out.append({**case, "step": name, "compile_s": statistics.median(times), "times_s": [round(x, 2) for x in times]})
  return out


STEP_VARIANTS = (("unrolled", False, "custom"), ("scan", True, "custom"), ("scan xla", True, "xla"))


def measure_step_times(preset: str, b: int, t: int, repeats: int, variants=STEP_VARIANTS,
                       baseline=None) -> list[dict[str, Any]]:
  """Median seconds per compiled train / scoring step of real (random) weights for each (label, scan, attention
  implementation) variant, and `baseline` (an earlier `Llama` class) if given, all run in alternation after one
  warm-up call each."""
  fns = {}
  todo = [(label, scan, impl, Llama) for label, scan, impl in variants]
  if baseline is not None:
    todo.append(("baseline", False, None, baseline))
  for label, scan, impl, cls in todo:
    model = build_model(presets[preset], scan_layers=scan, attention_impl=impl, abstract=False, llama_cls=cls)
    for name, (fn, args) in steps(model, b, t).items():
      compiled = jax.jit(fn)
      fns[f"{name} {label}"] = (lambda c=compiled, a=args: jax.block_until_ready(c(*a)))
  times = common.interleaved_times(fns, repeats=repeats, warmup=1)
  return [{"case": k, **common.summarize(v)} for k, v in times.items()]


def cases(args) -> list[dict[str, Any]]:
  """SmolLM2 (or `--preset`) unrolled / scan with each attention, the baseline, and 2 / 32 layers of its width."""
  b, t, name = args.batch, args.length, args.preset
  depth = presets[name].num_hidden_layers
  both = ("train", "score")
  out = [{"label": f"{name} {mode}", "preset": name, "layers": depth, "scan": mode == "scan",
          "batch": b, "length": t, "steps": both} for mode in ("unrolled", "scan")]
  out += [{"label": f"{name} {mode} xla", "preset": name, "layers": depth, "scan": mode == "scan",
           "attention": "xla", "batch": b, "length": t, "steps": both} for mode in ("unrolled", "scan")]
  if args.baseline:
    out.append({"label": f"{name} baseline", "preset": name, "layers": depth, "scan": False,
                "batch": b, "length": t, "steps": both, "llama_cls": baseline_llama(args.baseline)})
  out += [{"label": f"{n}-layer scan", "preset": name, "layers": n, "scan": True, "batch": b, "length": t,
           "steps": ("train",)} for n in (2, 32)]
  return out


def verdicts(rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
  """Compile-time ratios for the goals: unrolled / scan per step and attention, 32-layer / 2-layer."""
  by = {(r["label"], r["step"]): r["compile_s"] for r in rows}
  out = {}
  for step in ("train", "score"):
    for impl in ("", " xla"):
      u, s = by.get((f"{name} unrolled{impl}", step)), by.get((f"{name} scan{impl}", step))
      if u and s:
        out[f"scan_speedup_{step}{impl.replace(' ', '_')}"] = u / s
    old, s = by.get((f"{name} baseline", step)), by.get((f"{name} scan", step))
    if old and s:
      out[f"scan_speedup_{step}_vs_baseline"] = old / s
  if ("2-layer scan", "train") in by and ("32-layer scan", "train") in by:
    out["depth_ratio"] = by[("32-layer scan", "train")] / by[("2-layer scan", "train")]
  return out


def markdown(result: dict[str, Any]) -> str:
  rows = [[r["label"], r["step"], f"{r['batch']}x{r['length']}", f"{r['compile_s']:.1f} s",
           ", ".join(f"{x:.1f}" for x in r["times_s"])] for r in result["compiles"]]
  v = result["verdicts"]
  lines = [f"# Compile time of the train and scoring steps ({result['backend']})", "",
           f"Machine: {common.machine_line(result['machine'])}. Load average at start {result['loadavg']} "
           "(another job shared the cores: medians of interleaved repetitions). Produced by "
           f"`python benchmarks/compile_time.py{' --step-time' if result.get('step_times') else ''}"
           f"{' --baseline=...' if result.get('baseline') else ''}`.",
           "bfloat16 compute, int8 base, LoRA r=8 on q_proj and v_proj; train = lm loss + AdamW, "
           "score = hidden states of the answer row (`rows_b`) then the Yes/No softmax. Compile = lower + compile "
           "of a fresh jit, wall seconds.", "",
           common.markdown_table(["model", "step", "batch", "median compile", "each repeat (s)"], rows), "",
           "unrolled / scan: decoder layers in a Python loop / under `jax.lax.scan` (`Llama.scan_layers`); xla: "
           "`attention_impl='xla'` (`jax.nn.dot_product_attention`), otherwise the default custom-VJP `attend`"
           + (f"; baseline: the `llama.py` before the scan change (`{result['baseline']}`), its layers unrolled"
              if result.get("baseline") else "") + ".", ""]
  goal = []
  for step in ("train", "score"):
    for impl in ("", "_xla"):
      if f"scan_speedup_{step}{impl}" in v:
        x = v[f"scan_speedup_{step}{impl}"]
        goal.append(f"{result['preset']} {step} step{' (XLA attention)' if impl else ''}: unrolled / scan compile = {x:.1f}x "
                    f"(goal >= {GOALS['scan_speedup']:.0f}x: {'met' if x >= GOALS['scan_speedup'] else 'missed'}).")
    if f"scan_speedup_{step}_vs_baseline" in v:
      goal.append(f"Baseline / scan: {v[f'scan_speedup_{step}_vs_baseline']:.1f}x.")
  if "depth_ratio" in v:
    x = v["depth_ratio"]
    goal.append(f"32-layer / 2-layer scan compile = {x:.2f}x "
                f"(goal <= {GOALS['depth_ratio']}x: {'met' if x <= GOALS['depth_ratio'] else 'missed'}).")
  lines += [" ".join(goal), ""]
  if result.get("step_times"):
    rows = [[r["case"], f"{r['median_s']:.2f} s", f"{r['min_s']:.2f} s", f"{r['max_s']:.2f} s"]
            for r in result["step_times"]]
    lines += ["## Steady-state step time", "",
              f"Real (random) weights, one warm-up call, then {len(result['step_times'][0]['times_s'])} calls of each "
              "step in alternation; load average after: " + str(result.get("loadavg_after", "-")) + ".", "",
              common.markdown_table(["step", "median", "min", "max"], rows), ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results", help="folder for compile_time_<backend>.{json,md}")
  p.add_argument("--preset", default="smollm2-135m", choices=sorted(presets),
                 help="the model shape ('tiny' for tests)")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3, help="compiles per case (median reported)")
  p.add_argument("--only", default=None, help="comma-separated case labels to run (default: all)")
  p.add_argument("--step-time", action="store_true", help="also time the compiled SmolLM2 steps")
  p.add_argument("--step-repeats", type=int, default=3)
  p.add_argument("--step-variants", default=",".join(v[0] for v in STEP_VARIANTS),
                 help="comma-separated step-time variants: " + ", ".join(v[0] for v in STEP_VARIANTS))
  p.add_argument("--baseline", default=None,
                 help="path of an earlier llama.py (e.g. from `git show`) compiled and timed as 'baseline'")
  p.add_argument("--tag", default=None, help="output name suffix (default: the JAX backend)")
  args = p.parse_args(argv)
  todo = cases(args)
  if args.only:
    keep = set(args.only.split(","))
    todo = [c for c in todo if c["label"] in keep]
  result = {"backend": jax.default_backend(), "preset": args.preset, "machine": common.machine(),
            "loadavg": common.loadavg(), "baseline": args.baseline,
            "compiles": measure_compiles(todo, args.repeats)}
  result["verdicts"] = verdicts(result["compiles"], args.preset)
  if args.step_time:
    keep = args.step_variants.split(",")
    result["step_times"] = measure_step_times(args.preset, args.batch, args.length, args.step_repeats,
                                              [v for v in STEP_VARIANTS if v[0] in keep],
                                              baseline_llama(args.baseline) if args.baseline else None)
  result["loadavg_after"] = common.loadavg()
  common.write_result(args.out, f"compile_time_{args.tag or result['backend']}", result, markdown(result))
  return result


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()

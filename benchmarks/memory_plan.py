"""XLA's compiled memory plan of the LoRA train step (int8 base, bfloat16 compute), with and without remat.

  python benchmarks/memory_plan.py --out=benchmarks/results     # LLaMA-7B, Llama-3.1-8B, Qwen2.5-7B at 8x512
                                                                # (the last two on 1 and 8 fsdp devices), SmolLM2
  python benchmarks/memory_plan.py --measure                    # also run SmolLM2 steps: peak resident memory
  python benchmarks/memory_plan.py --models=qwen2.5-7b          # only these presets

The 8-device plans run on 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set
before JAX starts) on a (data 1, fsdp 8, tensor 1) mesh: the batch and every "embed" axis split 8 ways; the
plan's bytes are one device's.

The plan allocates nothing: the model, train state and batch are abstract shapes, and the step is
only lowered and compiled for this machine's backend, whose buffer assignment gives argument,
temporary and output bytes (peak = arguments + outputs - donated aliases + temporaries). It is this
backend's plan; another backend (GPU, TPU) fuses, schedules and rematerialises differently, so only
its own plan or a measured peak (`throughput.py --gpu`) answers the 16 GiB question there.
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below; the measured children inherit the setting
  import os  # pylint: disable=g-import-not-at-top
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):  # read when JAX starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=8").strip()  # DEVICES

import argparse
import functools
import json
import pathlib
import resource
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import throughput  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.model import quant  # pylint: disable=wrong-import-position
from clclm_jax.model.config import LlamaConfig, LoraConfig, presets  # pylint: disable=wrong-import-position
from clclm_jax.model.llama import Llama  # pylint: disable=wrong-import-position
from clclm_jax.model.lora import add_lora  # pylint: disable=wrong-import-position
from clclm_jax.train import sharding, state as state_lib, step as step_lib  # pylint: disable=wrong-import-position

DEVICES = 8  # simulated devices of the fsdp plans (the __main__ block above sets XLA_FLAGS to this)
# (preset, batch, length, simulated devices on the fsdp axis)
SHAPES = (("llama-7b", 8, 512, 1), ("llama-3.1-8b", 8, 512, 1), ("llama-3.1-8b", 8, 512, DEVICES),
          ("qwen2.5-7b", 8, 512, 1), ("qwen2.5-7b", 8, 512, DEVICES), ("smollm2-135m", 4, 256, 1),
          ("smollm2-135m", 8, 512, 1))
GOAL_GIB = 16  # planned peak per device that an 8B LoRA run should fit (a 16 GiB GPU / TPU v5e chip)
MEASURED = ("smollm2-135m",)  # shapes small enough to run here; a 7B step on a 2-core CPU takes too long
GIB = 2**30
HERE = pathlib.Path(__file__).resolve().parent


def abstract_model(cfg: LlamaConfig, lora: LoraConfig, *, remat: bool) -> Llama:
  """A bfloat16, int8-base `Llama` with LoRA as shapes only."""
  def build():
    model = Llama(cfg, dtype=jnp.bfloat16, quantize="int8", remat=remat, rngs=nnx.Rngs(0))
    return add_lora(model, lora, jax.random.key(0))
  return nnx.eval_shape(build)


def compiled_plan(cfg: LlamaConfig, batch: int, length: int, *, remat: bool, lora: LoraConfig = throughput.LORA,
                  devices: int = 1) -> dict[str, Any]:
  """Bytes of the compiled train step on this backend (AdamW, lm loss, one micro-batch, donated state), per
  device of a (1, `devices`, 1) fsdp mesh on the first `devices` devices."""
  model = abstract_model(cfg, lora, remat=remat)
  graphdef, params, frozen = state_lib.split_model(model)
  if len(jax.devices()) < devices:
    raise SystemExit(f"memory_plan: {devices} devices asked, {len(jax.devices())} present: set XLA_FLAGS="
                     f"--xla_force_host_platform_device_count={devices} before JAX starts")
  mesh = sharding.make_mesh((1, devices, 1), jax.devices()[:devices])
  tx = state_lib.make_optimizer(throughput.optim_config())
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  batch_abs = {k: tokens for k in ("tokens", "positions", "attention_mask", "loss_mask")}
  fn = step_lib.jit_train_step(graphdef, sharding.state_sharding(frozen, mesh), tx,
                               state_lib.state_shardings(params, tx, mesh), mesh, loss_weights={"lm": 1.0})
  t0 = time.perf_counter()
  m = fn.lower(state, batch_abs, frozen).compile().memory_analysis()
  compile_s = time.perf_counter() - t0
  sizes = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  return {"model": cfg_name(cfg), "batch": batch, "length": length, "remat": remat, "devices": devices,
          "compile_s": compile_s,
          **{f"{k}_bytes": v for k, v in sizes.items()},
          "peak_bytes": sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"],
          "frozen_bytes": quant.model_bytes(frozen), "trainable_bytes": quant.model_bytes(params)}


def measured_peak_rss(name: str, batch: int, length: int, remat: bool) -> int:
  """Peak resident bytes of a fresh process that runs two train steps of this shape (random weights)."""
  code = f"import memory_plan; memory_plan.run_steps({name!r}, {batch}, {length}, {remat})"
  out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
  return int(out.stdout.split()[-1])


def run_steps(name: str, batch: int, length: int, remat: bool):
  """Two jitted train steps of a random bf16 int8 + LoRA model; prints the process's peak RSS in bytes."""
  step = throughput.random_train_fn(presets[name], batch, length, remat=remat)
  step()
  step()
  print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def remat_dot_counts(layers: int = 16) -> dict[str, int]:
  """Dots in the compiled gradient of a toy residual MLP, without and with `jax.checkpoint` per layer:
  equal counts mean this backend's compiler dropped the recomputation remat asks for."""
  def layer(w, x):
    return x + jnp.tanh(jnp.tanh(x @ w) @ w.T)

  def counts(f):
    loss = lambda ws, x: jnp.sum(functools.reduce(lambda x, w: f(w, x), ws, x))  # noqa: E731
    ws, x = [jax.ShapeDtypeStruct((64, 256), jnp.float32)] * layers, jax.ShapeDtypeStruct((128, 64), jnp.float32)
    return jax.jit(jax.grad(loss)).lower(ws, x).compile().as_text().count(" dot(")

  return {"without": counts(layer), "with": counts(jax.checkpoint(layer))}


def cfg_name(cfg: LlamaConfig) -> str:
  return next((k for k, v in presets.items() if v == cfg), "custom")


def markdown(result: dict[str, Any]) -> str:
  rows = [[p["model"] + (" *" if p.get("earlier_run") else ""), f"{p['batch']}x{p['length']}",
           "yes" if p["remat"] else "no",
           "1" if p.get("devices", 1) == 1 else f"{p['devices']} (fsdp)",
           f"{p['frozen_bytes'] / GIB:.2f}", f"{p['argument_bytes'] / GIB:.2f}", f"{p['temp_bytes'] / GIB:.2f}",
           f"{p['peak_bytes'] / GIB:.2f}", "yes" if p["peak_bytes"] <= GOAL_GIB * GIB else "no",
           f"{p['rss_bytes'] / GIB:.2f}" if p.get("rss_bytes") else "-",
           f"{p['compile_s']:.0f} s"] for p in result["plans"]]
  return "\n".join([
      f"# Compiled memory plan of the LoRA train step ({result['backend']})", "",
      f"Machine: {common.machine_line(result['machine'])}. Produced by `python benchmarks/memory_plan.py"
      f"{' --measure' if any(p.get('rss_bytes') for p in result['plans']) else ''}`.",
      "bfloat16 compute, int8 base with float32 group scales, LoRA r=8 on q_proj and v_proj, AdamW; planned "
      "GiB from XLA's buffer assignment for this backend (planning allocates nothing).", "",
      common.markdown_table(["model", "batch", "remat", "devices", "frozen base GiB (all devices)",
                             "arguments GiB / device", "temporaries GiB / device", "planned peak GiB / device",
                             f"<= {GOAL_GIB} GiB", "measured peak RSS GiB", "compile"], rows), "",
      "Planned peak = arguments + outputs - donated aliases + temporaries; measured peak RSS (`--measure`) is "
      "a fresh process's whole resident memory after two steps of that shape with random weights (Python, "
      "JAX and the compiled program included). The plan is this backend's own: "
      f"{remat_note(result['remat_dots'])} What remat saves on a GPU, and the {GOAL_GIB} GiB goal for the 7B / 8B "
      "shapes, only a GPU run measures (`throughput.py --gpu`). The fsdp rows are one of "
      f"{DEVICES} simulated CPU devices: weights, optimizer state and batch split 8 ways (1 sequence per device)."
      + (" Rows marked * were kept from an earlier run of the script (`--models` replans only the named presets)."
         if any(p.get("earlier_run") for p in result["plans"]) else ""), ""])


def remat_note(dots: dict[str, int]) -> str:
  kept = dots["with"] > dots["without"]
  return (f"a 16-layer toy MLP's compiled gradient (layers unrolled, no scan) has {dots['without']} dots without "
          f"remat and {dots['with']} with it, so this compiler {'keeps' if kept else 'drops'} the recomputation of "
          f"unrolled layers{'.' if kept else ''}"
          f"{'' if kept else '; the model runs its layers under jax.lax.scan, whose checkpointed body it keeps.'}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results", help="folder for memory_plan_<backend>.{json,md}")
  p.add_argument("--measure", action="store_true", help=f"also run the {', '.join(MEASURED)} shapes (minutes)")
  p.add_argument("--models", default="", help="comma-separated presets to plan (default: every shape's); the "
                 "other presets' plans are kept from the existing result file")
  args = p.parse_args(argv)
  models = set(filter(None, args.models.split(","))) or {s[0] for s in SHAPES}
  plans = []
  todo = [(s, remat) for s in SHAPES if s[0] in models for remat in (False, True)]
  with tqdm.tqdm(todo, desc="memory plans", unit="plan") as bar:
    for (name, b, t, devices), remat in bar:
      bar.set_postfix_str(f"{name} {b}x{t} remat={remat} devices={devices}")
      plan = compiled_plan(presets[name], b, t, remat=remat, devices=devices)
      if args.measure and name in MEASURED:
        plan["rss_bytes"] = measured_peak_rss(name, b, t, remat)
      plans.append(plan)
  previous = pathlib.Path(args.out) / f"memory_plan_{jax.default_backend()}.json"
  if args.models and previous.is_file():  # keep the other presets' plans of the last full run (same backend)
    kept = [{**p, "earlier_run": True} for p in json.loads(previous.read_text())["plans"] if p["model"] not in models]
    order = [s[0] for s in SHAPES]
    plans = sorted(kept + plans, key=lambda p: order.index(p["model"]) if p["model"] in order else len(order))
  result = {"backend": jax.default_backend(), "machine": common.machine(), "plans": plans,
            "remat_dots": remat_dot_counts()}
  common.write_result(args.out, f"memory_plan_{result['backend']}", result, markdown(result))
  return result


if __name__ == "__main__":
  main()

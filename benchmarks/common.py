"""Shared benchmark helpers: machine description, interleaved median timing, matmul peak, writers."""

from collections.abc import Callable, Iterable, Mapping, Sequence
import ast
import importlib.metadata
import json
import os
import pathlib
import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from clclm_jax.data import tallrec
from clclm_jax.train import malloc

TALLREC_PUBLISHED = tallrec.PUBLISHED_AUC  # LLaMA-7B, test AUC x 100 by shots
FUSED_GOALS = {"movie": {16: 74, 64: 75, 256: 77}, "book": {16: 71, 64: 72, 256: 74}}  # issue 5, mean of 3 seeds
RECIPES = {"movie": "residual", "book": "residual"}  # fused_quality's name of configs/<domain>.py
# fused_quality's name of configs/<domain>_soft_tokens.py: the soft-token recipe its fused ablations change
SOFT_TOKEN_RECIPES = {"movie": "fused+align_cl", "book": "fused+hint_kd-text_cl"}
SHARP_HINT_SCALE = 3.0  # fused_quality's `fused+sharp_hint`: the hint's P(like) from this x the encoder's logit
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "numpy")


def mean_and_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation over seeds (0 for one seed)."""
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def mean_std(values: list[float]) -> str:
  """'mean ± std' over seeds, 2 decimals (the mean alone for one seed)."""
  mean, std = mean_and_std(values)
  return f"{mean:.2f}" + (f" ± {std:.2f}" if len(values) > 1 else "")


def group_by(items: Iterable[Any], key: Callable[[Any], Any]) -> dict[Any, list]:
  """{key(item): [items with that key]}, keys in first-seen order."""
  groups: dict[Any, list] = {}
  for item in items:
    groups.setdefault(key(item), []).append(item)
  return groups


def stopped_note(why: str) -> str:
  """How a fused_quality run that stopped before its end is described in every table that lists it."""
  return f"stopped early by {why}"


def encoder_test_rows(summary: Mapping[str, Any]) -> list[tuple[str, Mapping[str, float]]]:
  """(label, test metrics) for a pretraining summary: its own protocol, then the other one if measured."""
  rows = [("ours, measured", summary["test"])]
  if "test_history_excluded" in summary:
    rows.append(("ours, history items excluded as in CoSeRec's code", summary["test_history_excluded"]))
  if "test_history_kept" in summary:
    rows.append(("ours, history items kept as in RecBole", summary["test_history_kept"]))
  return rows


def split_of(r: Mapping[str, Any]) -> str:
  """The split a fused_quality row (or domain metadata) was scored on; rows from before `--split` are test rows."""
  return r.get("split", "test")


def loadavg() -> list[float]:
  """1/5/15-minute load averages (other processes sharing the cores skew timings)."""
  try:
    return [float(x) for x in pathlib.Path("/proc/loadavg").read_text().split()[:3]]
  except OSError:
    return list(os.getloadavg())


def cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """What ran the benchmark: CPU, cores, memory, accelerator and library versions."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  dev = jax.devices()[0]
  mem_kb = None
  try:
    mem_kb = int(pathlib.Path("/proc/meminfo").read_text().split()[1])
  except (OSError, IndexError, ValueError):
    pass
  return {
      "cpu": cpu_model(),
      "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
      "memory_gib": None if mem_kb is None else round(mem_kb / 2**20, 1),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax_backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", dev.platform),
      "device_count": jax.device_count(),
      "versions": versions,
      "malloc_keeps_freed": all(os.environ.get(k) == v for k, v in malloc.KEEP_FREED.items()),
  }


def machine_line(m: Mapping[str, Any]) -> str:
  """One markdown line describing the machine."""
  v = m["versions"]
  libs = ", ".join(f"{k} {v[k]}" for k in ("jax", "flax", "torch", "transformers", "peft") if v.get(k))
  kept = "; glibc malloc keeps freed memory (clclm_jax/train/malloc.py)" if m.get("malloc_keeps_freed") else ""
  return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; JAX backend {m['jax_backend']} "
          f"({m['device']} x{m['device_count']}); {libs}{kept}")


def interleaved_times(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
  """Seconds per call of each function, run in alternation (A B B A ...) so drift in load hits all alike.

  Every `fn` must block until its work is done. `warmup` calls of each (compilation, caches) are not timed.
  """
  names = list(fns)
  for _ in range(warmup):
    for name in names:
      fns[name]()
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - start)
  return times


def summarize(times: Sequence[float]) -> dict[str, Any]:
  """Median (the reported number), min, max and the raw times of one timed function."""
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "times_s": [round(t, 5) for t in times]}


def matmul_probe(dtype=jnp.float32, shape=(1024, 576, 1536), calls: int = 1) -> tuple[Callable[[], None], float]:
  """A no-argument callable running one jitted XLA matmul `[m, k] @ [k, n]` `calls` times (blocking), and the
  FLOPs it does. Accumulation is float32 (XLA:CPU's bf16 x bf16 -> bf16 dot runs at half the speed of
  bf16 x bf16 -> f32), or int32 for int8 (the dot that int8 activations times int8 weights would run)."""
  m, k, n = shape
  if jnp.issubdtype(dtype, jnp.integer):
    a, b = (jax.random.randint(jax.random.key(i), s, -127, 128, dtype) for i, s in enumerate(((m, k), (k, n))))
    acc = jnp.int32
  else:
    a, b = (jax.random.normal(jax.random.key(i), s, dtype) for i, s in enumerate(((m, k), (k, n))))
    acc = jnp.float32
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=acc))

  def run() -> None:
    for _ in range(calls):
      f(a, b).block_until_ready()

  return run, 2.0 * m * k * n * calls


def matmul_peak(dtype=jnp.float32, shape=(1024, 576, 1536), repeats: int = 20) -> dict[str, Any]:
  """Measured FLOP/s of `matmul_probe` (SmolLM2's MLP shape by default): median and best of `repeats` calls."""
  run, flops = matmul_probe(dtype, shape)
  times = interleaved_times({"matmul": run}, repeats=repeats, warmup=3)["matmul"]
  return {"shape": list(shape), "dtype": jnp.dtype(dtype).name, "median_s": statistics.median(times),
          "flop_per_s": flops / statistics.median(times), "best_flop_per_s": flops / min(times)}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; floats are printed as given, so format them before."""
  lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _plain(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj, indent=2, default=_plain) + "\n")
  return path


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text if text.endswith("\n") else text + "\n")
  return path


def write_result(out: str | os.PathLike, stem: str, result: Any, text: str, echo: bool = True) -> None:
  """A benchmark's `<stem>.json` (the numbers) and `<stem>.md` (the table) under `out`; prints the table."""
  write_json(pathlib.Path(out) / f"{stem}.json", result)
  write_text(pathlib.Path(out) / f"{stem}.md", text)
  if echo:
    print(text)


def si(x: float, unit: str = "") -> str:
  """1.23e9 -> '1.23 G' + unit."""
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}".rstrip()


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """['a.b=3', 'c=x'] -> {'a.b': 3, 'c': 'x'} (Python literals, else strings)."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ValueError(f"override {item!r}: write key=value")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def apply_overrides(c, overrides: dict[str, Any]):
  """Sets each dotted key of `overrides` in the ConfigDict `c` (a list where a tuple was: a tuple); returns `c`."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ValueError(f"override {key}: the config has no such field")
    node[leaf] = tuple(value) if isinstance(node[leaf], tuple) and isinstance(value, list) else value  # [50]: (50,)
  return c

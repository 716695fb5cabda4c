"""How far apart CALRec's two towers are, before or after training: on seeded batches of the target domain's
training examples, the mean cosine between pooled vectors (a row's own pair on the diagonal, other rows off it)
for v_U-v_U, v_T-v_T, v_U-v_T and v_T|U-v_T (v_U as the prompt's mean, "U"; as the state at the cue after it,
"U_cue", `calrec.user_pooling="cue"`; and as the prompt's last state, "U_last"), and the InfoNCE terms at the config's temperature with negatives from both towers (NT-Xent) and from the other
tower only (CLIP), each against its chance value.

  python benchmarks/calrec_towers.py                                           # the untrained SmolLM2
  python benchmarks/calrec_towers.py --workdir runs/calrec_ml100k --set calrec.same_tower_negatives=False

With `--workdir` the run's final parameters (its last stage's best checkpoint) are loaded first; `--set` overrides
the config as the run had it (its stage list decides which checkpoint is read). Prints, and writes
`--out/calrec_towers[_<tag>].{json,md}`.
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()

import argparse
import importlib
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

from clclm_jax.contrastive import losses
from clclm_jax.data import nextitem_tokens
from clclm_jax.seqrec import calrec
from clclm_jax.train.evaluate import progress

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

PAIRS = (("U-U", "u", "u"), ("U_cue-U_cue", "uc", "uc"), ("U_last-U_last", "ul", "ul"), ("T-T", "t", "t"),
         ("U-T", "u", "t"), ("U_cue-T", "uc", "t"), ("U_last-T", "ul", "t"), ("T|U-T", "tu", "t"))
TERMS = (("calrec_ut (mean)", "u"), ("calrec_ut (cue)", "uc"), ("calrec_ut (last)", "ul"), ("calrec_tt", "tu"))


def tower_vectors(r: calrec.Run, batches: int, batch_size: int, seed: int) -> list[dict[str, np.ndarray]]:
  """v_U, v_T|U (one joint pass) and v_T (the item tower) of `batches` seeded batches of training examples."""
  name = r.config.data.dataset
  xs = calrec.train_examples(r, name, r.config.calrec.target.max_prefixes)
  rng, llm, out = np.random.default_rng(seed), r.model.llm, []
  for _ in progress(range(batches), desc="batches"):
    rows = [xs[i] for i in rng.choice(len(xs), batch_size, replace=False)]
    b = {k: jnp.asarray(v) for k, v in nextitem_tokens.train_batch(r.tokens[name], rows, r.layout).items()}
    h = llm.hidden_states(b["tokens"], None, b["attention_mask"])
    last = jnp.zeros_like(b["history_mask"]).at[jnp.arange(len(rows)), b["history_mask"].cumsum(1).argmax(1)].set(1)
    out.append({"u": calrec.user_pool(h, b, "mean"), "uc": calrec.user_pool(h, b, "cue"),
                "ul": losses.masked_mean(h, last), "tu": losses.masked_mean(h, b["target_mask"]),
                "t": calrec.item_vectors(llm, b)})
  return [{k: np.asarray(v, np.float64) for k, v in x.items()} for x in out]


def cosines(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Mean cosine of each row with its own pair (diagonal) and with the other rows (off the diagonal)."""
  a, b = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
  s = a @ b.T
  off = ~np.eye(len(s), dtype=bool)
  return float(np.diag(s).mean()), float(s[off].mean())


def measure(vectors: list[dict[str, np.ndarray]], temperature: float) -> dict:
  out = {"cosine": {}, "infonce": {}}
  for label, x, y in PAIRS:
    diag, off = zip(*(cosines(v[x], v[y]) for v in vectors))
    out["cosine"][label] = {"own": float(np.mean(diag)), "others": float(np.mean(off))}
  n = len(vectors[0]["u"])
  for same in (True, False):
    key = "both towers" if same else "other tower"
    terms = {t: float(np.mean([losses.info_nce(jnp.asarray(v[a]), jnp.asarray(v["t"]), temperature=temperature,
                                               similarity="cosine", same_side=same) for v in vectors]))
             for t, a in TERMS}
    out["infonce"][key] = terms | {"chance": float(np.log(2 * n - 1 if same else n))}
  return out


def markdown(result: dict) -> str:
  m = result["measured"]
  lines = [f"CALRec towers, {result['config']} ({result['model']}), {result['batches']} batches of "
           f"{result['batch_size']} training examples of {result['dataset']}; {common.machine_line(result['machine'])}",
           "", common.markdown_table(["vectors", "cosine with own pair", "cosine with other rows"],
                                     [[k, f"{v['own']:.3f}", f"{v['others']:.3f}"] for k, v in m["cosine"].items()]),
           "", common.markdown_table(
               ["InfoNCE negatives", *(t for t, _ in TERMS), "chance"],
               [[k, *(f"{v[t]:.3f}" for t, _ in TERMS), f"{v['chance']:.3f}"] for k, v in m["infonce"].items()])
           + f"  (temperature {result['temperature']:g})"]
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="calrec_ml100k", help="a module of configs/")
  p.add_argument("--workdir", default="", help="a trained run whose parameters to load (default: untrained)")
  p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
  p.add_argument("--batches", type=int, default=4)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tag", default="", help="suffix of the result files")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
  args = p.parse_args(argv)
  config = common.apply_overrides(importlib.import_module(f"configs.{args.config}").get_config(),
                                  common.parse_overrides(args.set))
  with config.unlocked():
    config.data.mixture = (config.data.dataset,)  # only the target's data is read; no other dataset loaded
  r = calrec.build(config)
  if args.workdir:
    calrec.restore(r, pathlib.Path(args.workdir))
  result = {"config": args.config, "overrides": args.set, "workdir": args.workdir,
            "model": "trained" if args.workdir else "untrained", "dataset": config.data.dataset,
            "batches": args.batches, "batch_size": args.batch_size, "seed": args.seed,
            "temperature": config.calrec.temperature, "machine": common.machine(),
            "measured": measure(tower_vectors(r, args.batches, args.batch_size, args.seed), config.calrec.temperature)}
  common.write_result(args.out, "calrec_towers" + (f"_{args.tag}" if args.tag else ""), result, markdown(result))


if __name__ == "__main__":
  main()

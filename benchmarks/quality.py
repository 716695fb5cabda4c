"""Few-shot TALLRec AUC: zero-shot and LoRA rec tuning against TALLRec's numbers and a no-training heuristic.

  python benchmarks/quality.py --out=benchmarks/results --methods heuristic zero_shot lora \\
      --domains movie book --shots 16 64 256 --seeds 0 1 2 --test-size -1     # the whole grid (GPU-sized)
  python benchmarks/quality.py --methods lora --domains movie --shots 16 --test-size 200 --merge  # one cell

`--test-size n > 0` scores a deterministic subset (`fewshot(test, n, seed)`, the same rows the train
loop evaluates for that seed); every row records its test set. `--merge [FILES]` keeps the rows of earlier
runs (OUT/quality.json and FILES; a row is replaced when method, domain, shots, seed and test set agree).
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import base  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.data import fewshot, tallrec, tokenize  # pylint: disable=wrong-import-position
from clclm_jax.train import evaluate, loop, sharding, state as state_lib  # pylint: disable=wrong-import-position

# TALLRec (arXiv 2305.00447) Table: AUC x 100 of LLaMA-7B rec tuning, by training shots.
TALLREC_PUBLISHED = {"movie": {16: 67.24, 64: 67.48, 256: 71.98}, "book": {16: 56.36, 64: 60.39, 256: 64.38}}
METHODS = ("heuristic", "zero_shot", "lora")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results", help="folder for quality.{json,md,png}")
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--domains", nargs="+", default=["movie", "book"], choices=("movie", "book"))
  p.add_argument("--shots", nargs="+", type=int, default=[16, 64, 256])
  p.add_argument("--seeds", nargs="+", type=int, default=[0])
  p.add_argument("--test-size", type=int, default=-1, help="<= 0: the whole test set; else a seeded subset")
  p.add_argument("--preset", default="", help="a random model of this preset's shape (e.g. 'tiny', for tests)")
  p.add_argument("--epochs", type=int, default=None, help="train.num_epochs (default: configs/base.py)")
  p.add_argument("--max-steps", type=int, default=None, help="train.max_steps (overrides epochs)")
  p.add_argument("--batch-size", type=int, default=None, help="train.batch_size")
  p.add_argument("--micro-batch-size", type=int, default=None, help="train.micro_batch_size")
  p.add_argument("--lr", type=float, default=None, help="optim.lr")
  p.add_argument("--valid-size", type=int, default=None, help="data.valid_size (early stopping set)")
  p.add_argument("--eval-every", type=int, default=None, help="train.eval_every")
  p.add_argument("--workdir", default="", help="keep LoRA runs here (default: a temporary folder)")
  p.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                 help="keep the rows of OUT/quality.json and of these quality.json files (new rows win)")
  return p.parse_args(argv)


def make_config(args, domain: str, shots: int, seed: int):
  """configs/base.py with this cell's domain, shots, seed, test subset and the command-line overrides."""
  c = base.get_config()
  c.name = f"quality_{domain}_{shots}_{seed}"
  c.seed = seed
  c.data.domain, c.data.shots, c.data.fewshot_seed = domain, shots, seed
  c.data.test_size = args.test_size if args.test_size > 0 else -1
  if args.preset:
    c.model.preset = args.preset
  overrides = {("train", "num_epochs"): args.epochs, ("train", "max_steps"): args.max_steps,
               ("train", "batch_size"): args.batch_size, ("train", "micro_batch_size"): args.micro_batch_size,
               ("optim", "lr"): args.lr, ("data", "valid_size"): args.valid_size,
               ("train", "eval_every"): args.eval_every}
  for (group, field), value in overrides.items():
    if value is not None:
      setattr(c[group], field, value)
  return c


def test_set(domain: str, test_size: int, seed: int) -> tuple[list, dict[str, Any]]:
  """The test interactions scored for this seed, and a description recorded with every row."""
  full = tallrec.tallrec_splits(domain).test
  if test_size <= 0 or test_size >= len(full):
    return full, {"test_n": len(full), "test_full_n": len(full), "subset": False, "subset_seed": None}
  return fewshot.fewshot(full, test_size, seed), {"test_n": test_size, "test_full_n": len(full), "subset": True,
                                                   "subset_seed": seed}


def like_ratio(interaction) -> float:
  """Share of liked items in the prompt's history (0.5 for an empty history): no model, no training."""
  likes = interaction.history_likes
  return float(np.mean(likes)) if likes else 0.5


def heuristic_row(domain: str, test_size: int, seed: int | None) -> dict[str, Any]:
  xs, desc = test_set(domain, test_size, seed or 0)
  scores = np.asarray([like_ratio(x) for x in xs])
  labels = np.asarray([x.label for x in xs])
  return {"method": "heuristic", "domain": domain, "shots": 0, "seed": seed, **desc,
          "auc": evaluate.auc(scores, labels)}


def zero_shot_row(args, domain: str, seed: int, model_and_tokenizer) -> dict[str, Any]:
  """P(Yes) of the untrained model (LoRA B = 0) on the test set, through the train loop's data and scoring."""
  config = make_config(args, domain, shots=0, seed=seed)
  model, tokenizer = model_and_tokenizer
  _, evals = loop.rec_data(config, tokenizer, splits=("test",))
  mesh = sharding.make_mesh(config.mesh)
  graphdef, params, frozen = state_lib.split_model(model)
  params_sh, frozen_sh = sharding.state_sharding(params, mesh), sharding.state_sharding(frozen, mesh)
  eval_step = evaluate.compile_eval_step(graphdef, params_sh, frozen_sh, mesh,
                                         *tokenize.answer_token_ids(tokenizer, config.data.template))
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    metrics = evaluate.score(eval_step, sharding.put(params, params_sh), sharding.put(frozen, frozen_sh),
                             evals["test"], mesh).metrics()
  _, desc = test_set(domain, args.test_size, seed)
  return {"method": "zero_shot", "domain": domain, "shots": 0, "seed": seed, **desc, "auc": metrics["auc"],
          "accuracy": metrics["accuracy"], "mean_p_yes": metrics["mean_p_yes"],
          "eval_s": time.perf_counter() - start, "model": config.model.preset or config.model.source}


def lora_row(args, domain: str, shots: int, seed: int, workdir: pathlib.Path) -> dict[str, Any]:
  """TALLRec-style LoRA rec tuning with `loop.train` (early stopping on validation AUC), then test AUC."""
  config = make_config(args, domain, shots, seed)
  start = time.perf_counter()
  summary = loop.train(config, workdir / config.name)
  _, desc = test_set(domain, args.test_size, seed)
  t = config.train
  return {"method": "lora", "domain": domain, "shots": shots, "seed": seed, **desc, "auc": summary["test_auc"],
          "valid_auc": summary["valid_auc"], "valid_size": config.data.valid_size, "steps": summary["steps"],
          "best_step": summary["best_step"], "train_tokens_per_s": summary["tokens_per_s"],
          "wall_s": time.perf_counter() - start, "model": config.model.preset or config.model.source,
          "train": {"batch_size": t.batch_size, "micro_batch_size": t.micro_batch_size, "num_epochs": t.num_epochs,
                    "max_steps": t.max_steps, "eval_every": t.eval_every, "patience": t.patience,
                    "lr": config.optim.lr}}


def row_key(r: dict[str, Any]) -> tuple:
  return (r["method"], r["domain"], r["shots"], r["seed"], r["test_n"], r["subset_seed"])


def published_rows() -> list[dict[str, Any]]:
  return [{"method": "tallrec_published", "domain": d, "shots": s, "seed": None, "auc": v / 100,
           "test_n": None, "test_full_n": None, "subset": False, "subset_seed": None,
           "model": "LLaMA-7B (TALLRec paper)"} for d, by in TALLREC_PUBLISHED.items() for s, v in by.items()]


def test_label(r: dict[str, Any]) -> str:
  if r["test_n"] is None:
    return "paper's test set"
  if r["subset"]:
    return f"SUBSET {r['test_n']}/{r['test_full_n']} (seed {r['subset_seed']})"
  return f"full ({r['test_n']})"


def auc_table(rows_in: list[dict[str, Any]]) -> str:
  """One markdown row per (method, domain, shots, test set): mean AUC x100 (± std over seeds)."""
  names = {"tallrec_published": "TALLRec, published (LLaMA-7B)", "heuristic": "history like-ratio (no training)",
           "zero_shot": "ours, zero-shot", "lora": "ours, LoRA rec tuning"}
  groups: dict[tuple, list] = {}
  for r in rows_in:
    groups.setdefault((r["method"], r["domain"], r["shots"], r["test_n"], r["subset"]), []).append(r)
  order = {m: i for i, m in enumerate(names)}
  rows = []
  for key in sorted(groups, key=lambda k: (k[1], order[k[0]], k[2], k[3] or 0)):
    rs = groups[key]
    aucs = [100 * r["auc"] for r in rs]
    spread = f" ± {statistics.stdev(aucs):.2f}" if len(aucs) > 1 else ""
    seeds = ",".join(str(r["seed"]) for r in rs if r["seed"] is not None) or "-"
    extra = ""
    if key[0] == "lora":
      extra = (f"{rs[0]['steps']} steps (best {rs[0]['best_step']}), batch {rs[0]['train']['batch_size']}, "
               f"valid {rs[0]['valid_size']}, {statistics.mean(r['wall_s'] for r in rs) / 60:.1f} min")
    elif key[0] == "zero_shot":
      extra = f"{statistics.mean(r['eval_s'] for r in rs) / 60:.1f} min scoring"
    rows.append([key[1], names[key[0]], key[2] or "-", seeds, test_label(rs[0]),
                 f"{statistics.mean(aucs):.2f}{spread}", extra])
  return common.markdown_table(["domain", "method", "shots", "seeds", "test set", "AUC x100", "notes"], rows)


def markdown(result: dict[str, Any]) -> str:
  lines = ["# Few-shot TALLRec AUC (x100)", "", f"Machine: {common.machine_line(result['machine'])}.",
           f"Model: {result['model']} (int8 base, LoRA r=8, alpha 16, dropout 0.05 on q, v). "
           "Rows marked SUBSET score a seeded subset of the test set, not the whole of it; "
           "they are not directly comparable with full-test rows.", "", auc_table(result["rows"]), ""]
  return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """AUC against training shots per domain: TALLRec's curve, our LoRA points, flat lines for the rest."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  domains = sorted({r["domain"] for r in result["rows"]})
  fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), squeeze=False)
  for ax, domain in zip(axes[0], domains):
    rows = [r for r in result["rows"] if r["domain"] == domain]
    pub = sorted((r["shots"], 100 * r["auc"]) for r in rows if r["method"] == "tallrec_published")
    ax.plot(*zip(*pub), "o-", color="tab:gray", label="TALLRec published (LLaMA-7B)")
    for method, style, color in (("heuristic", "--", "tab:green"), ("zero_shot", ":", "tab:orange")):
      by_test: dict[str, list] = {}
      for r in rows:
        if r["method"] == method:
          by_test.setdefault(test_label(r), []).append(100 * r["auc"])
      for label, aucs in by_test.items():
        name = "like-ratio heuristic" if method == "heuristic" else "ours zero-shot"
        ax.axhline(statistics.mean(aucs), ls=style, color=color, label=f"{name}, {label}")
    lora: dict[tuple, list] = {}
    for r in rows:
      if r["method"] == "lora":
        lora.setdefault((test_label(r),), []).append((r["shots"], 100 * r["auc"]))
    for (label,), pts in lora.items():
      ax.plot(*zip(*sorted(pts)), "s", color="tab:blue", label=f"ours LoRA, {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([16, 64, 256], ["16", "64", "256"])
    ax.set_xlabel("training shots")
    ax.set_ylabel("test AUC x100")
    ax.set_title(domain)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  sources = [] if args.merge is None else [out / "quality.json", *map(pathlib.Path, args.merge)]
  previous = [json.loads(f.read_text()) for f in sources if f.exists()]
  rows = []
  model_and_tokenizer = None
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(args.workdir or tmp)
    for domain in args.domains:
      if "heuristic" in args.methods:
        rows.append(heuristic_row(domain, -1, None))
      for seed in args.seeds:
        if "heuristic" in args.methods and args.test_size > 0:
          rows.append(heuristic_row(domain, args.test_size, seed))
        if "zero_shot" in args.methods:
          model_and_tokenizer = model_and_tokenizer or loop.build_model(make_config(args, domain, 0, seed))
          rows.append(zero_shot_row(args, domain, seed, model_and_tokenizer))
        if "lora" in args.methods:
          rows += [lora_row(args, domain, shots, seed, workdir) for shots in args.shots]
        print(json.dumps(rows[-1]), flush=True)
  new_keys = {row_key(r) for r in rows}
  kept = {}
  for r in (r for p in previous for r in p["rows"] if r["method"] != "tallrec_published"):
    if row_key(r) not in new_keys:
      kept[row_key(r)] = r
  runs = [run for p in previous for run in p.get("runs", [])]
  result = {"machine": common.machine(), "model": args.preset or base.get_config().model.source,
            "runs": runs + [{"argv": sys.argv[1:] if argv is None else argv, "loadavg": common.loadavg()}],
            "rows": published_rows() + list(kept.values()) + rows}
  common.write_json(out / "quality.json", result)
  common.write_text(out / "quality.md", markdown(result))
  plot(result, out / "quality.png")
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()

"""The sequential-recommendation table (issue 48): full-catalogue Recall@1/5/10 and NDCG@5/10 on the leave-one-out
test split of MovieLens-100K (every test user) and Amazon Beauty (2,000 seeded test users; ID models also on all
users), every method of a table scored on the same users.

  python benchmarks/seqrec_table.py                                  # every row, both datasets, the recipes
  python benchmarks/seqrec_table.py --rows=popularity,bm25_last,id_encoder,zero_shot
  python benchmarks/seqrec_table.py --rows=calrec --datasets=ml100k --seeds=0 --steps=40   # a small budget

Rows: `popularity` (training-split counts), `bm25_last` (BM25 of the catalogue against the last history item's
text), `id_encoder` (the project's SASRec encoder pretrained CL4SRec/CoSeRec-style: next-item CE + augmentation
InfoNCE, configs/pretrain_<dataset>.py), `zero_shot` (SmolLM2 untrained: generation + BM25), `calrec` (CALRec,
configs/calrec_<dataset>.py: two rows, generation + BM25 and dense), and its ablations `calrec_no_tt`,
`calrec_no_ut`, `calrec_no_mixture`; the CALRec rows are the mean and sample spread over `--seeds`.

Budget: `--steps` (each CALRec stage's updates), `--set` (CALRec config overrides), `--llm_users` (LLM rows on
fewer seeded users) and `--id_budget_min` / `--id_set` (the encoder) shrink the recipes for a CPU; every row
records its budget, and a row run with any of them is marked as such in the JSON (`full_recipe: false`) and the
markdown. Results merge into `--out/<stem>.json` (a row replaces the one of the same dataset, row and users), so
the table can be filled by several commands; `--fresh` starts it again. Run folders (resumable; a finished one
is restored, not retrained) live under `--workdir`.
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import argparse
import functools
import importlib
import json
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.contrastive import pretrain
from clclm_jax.data import nextitem, sequences
from clclm_jax.seqrec import baselines, calrec, metrics
from clclm_jax.train import cli, sharding, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # configs/ and common.py
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DATASETS = ("ml100k", "beauty")
CHEAP_ROWS = ("popularity", "bm25_last", "id_encoder", "zero_shot")
CALREC_RUNS = ("calrec", "calrec_no_tt", "calrec_no_ut", "calrec_no_mixture")
ROWS = CHEAP_ROWS + CALREC_RUNS
PROTOCOL_USERS = {"ml100k": -1, "beauty": 2000}  # test users of the table (-1: all)
METRICS = ("Recall@1", "Recall@5", "Recall@10", "NDCG@5", "NDCG@10")
LABELS = {"popularity": "popularity", "bm25_last": "BM25 of the last history item",
          "id_encoder": "SASRec encoder, CL4SRec/CoSeRec pretraining (ID)", "zero_shot": "zero-shot LLM",
          "calrec": "CALRec", "calrec_no_tt": "CALRec without L_TT", "calrec_no_ut": "CALRec without L_UT",
          "calrec_no_mixture": "CALRec without the multi-domain stage"}
KINDS = {"generation": "generation + BM25", "dense": "dense"}
GOAL = {"Recall@1": 1.37, "NDCG@10": 1.24}  # CALRec's reported gains over its best baseline (issue 48)



def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  csv = lambda text: [x for x in text.split(",") if x]  # noqa: E731
  p.add_argument("--datasets", type=csv, default=list(DATASETS), help="datasets: ml100k, beauty")
  p.add_argument("--rows", type=csv, default=list(ROWS), help=f"rows to run: {', '.join(ROWS)}")
  p.add_argument("--seeds", type=lambda t: [int(x) for x in csv(t)], default=[0, 1, 2],
                 help="seeds of the CALRec rows (config.seed)")
  p.add_argument("--steps", type=int, default=-1, help="budget: updates per CALRec stage (-1: the config's)")
  p.add_argument("--set", type=csv, default=[], help="budget: CALRec config overrides, key=value,... "
                 "(e.g. data.max_history=10,eval.num_samples=1)")
  p.add_argument("--llm_users", type=int, default=-1, help="budget: LLM rows on this many seeded test users (-1: "
                 "the table's users); the other rows are scored on them too")
  p.add_argument("--calrec_eval", type=csv, default=["generation", "dense"], help="rankings of the CALRec runs")
  p.add_argument("--id_budget_min", type=float, default=-1.0, help="budget: encoder training minutes (-1: the "
                 "config's)")
  p.add_argument("--id_set", type=csv, default=[], help="budget: encoder config overrides, key=value,... "
                 "(e.g. ce_negatives=1024)")
  p.add_argument("--calrec_config", default="calrec_{dataset}", help="configs/<module> of the LLM rows")
  p.add_argument("--id_config", default="pretrain_{dataset}", help="configs/<module> of the ID encoder")
  p.add_argument("--workdir", default="runs/seqrec", help="root of the run folders (resumable)")
  p.add_argument("--out", default="benchmarks/results", help="folder for <stem>.json and <stem>.md")
  p.add_argument("--stem", default="seqrec_table", help="file name stem of the results")
  p.add_argument("--fresh", action="store_true", help="start the table again instead of merging into <stem>.json")
  args = p.parse_args(argv)
  unknown = (set(args.rows) - set(ROWS)) | (set(args.datasets) - set(DATASETS)) | (
      set(args.calrec_eval) - set(KINDS))
  if unknown:
    p.error(f"unknown {sorted(unknown)}: rows {ROWS}, datasets {DATASETS}, calrec_eval {tuple(KINDS)}")
  return args

# --- Configs and budgets -------------------------------------------------------------------------

def load_config(pattern: str, dataset: str) -> ConfigDict:
  return importlib.import_module(f"configs.{pattern.format(dataset=dataset)}").get_config()


def calrec_config(pattern: str, dataset: str, run: str, seed: int, steps: int, overrides: dict) -> ConfigDict:
  """The CALRec config of a table run: `zero_shot` has no stage; the ablations switch one part off."""
  c = common.apply_overrides(load_config(pattern, dataset), overrides)
  c.data.dataset, c.seed = dataset, seed
  c.data.test_size = 0  # the table scores its own users (below), after training
  if steps >= 0:
    c.calrec.mixture.steps = c.calrec.target.steps = steps
  if run == "zero_shot":
    c.calrec.mixture.steps = c.calrec.target.steps = 0
  elif run == "calrec_no_tt":
    c.calrec.loss_weights.calrec_tt = 0.0
  elif run == "calrec_no_ut":
    c.calrec.loss_weights.calrec_ut = 0.0
  elif run == "calrec_no_mixture":
    c.calrec.mixture.steps = 0
  return c


def id_config(pattern: str, dataset: str, budget_min: float, overrides: dict) -> ConfigDict:
  c = common.apply_overrides(load_config(pattern, dataset), overrides)
  c.dataset = dataset
  if budget_min > 0:
    c.time_budget_min = budget_min
  return c


def run_folder(root: str, dataset: str, name: str, budget: dict) -> pathlib.Path:
  """A run's folder: the budget is part of the name, so runs of other budgets never resume each other."""
  parts = [f"{k.replace('.', '-')}{v}" for k, v in sorted(budget.items()) if k != "seed"]
  tag = "_".join(parts) if parts else "recipe"
  tag = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in tag)
  return pathlib.Path(root) / dataset / name / tag


# --- Users ---------------------------------------------------------------------------------------

def user_sets(data: nextitem.NextItemData, protocol_n: int, llm_n: int, seed: int) -> dict[str, list]:
  """{label: test examples}: all users, the table's seeded subset and the LLM rows' (a smaller budget)."""
  every = nextitem.examples(data, "test")
  sets = {"all": every}
  n = len(every) if protocol_n < 0 else min(protocol_n, len(every))
  if n < len(every):
    sets[f"{n} seeded"] = baselines.sample_examples(every, n, seed)
  if 0 <= llm_n < n:
    sets[f"{llm_n} seeded"] = baselines.sample_examples(every, llm_n, seed)
  return sets


# --- Rows ----------------------------------------------------------------------------------------

def row(dataset: str, name: str, kind: str | None, users: str, per_seed: list[dict], wall: dict, budget: dict,
        full: bool, folders: Sequence[str] = (), extra: dict | None = None) -> dict:
  means = {k: common.mean_and_std([m[k] for m in per_seed]) for k in METRICS}
  label = LABELS[name] + (f" ({KINDS[kind]})" if kind else "")
  return {"dataset": dataset, "row": name, "kind": kind, "label": label, "users": users,
          "count": per_seed[0]["count"], "seeds": len(per_seed), "mean": {k: v[0] for k, v in means.items()},
          "std": {k: v[1] for k, v in means.items()}, "per_seed": per_seed, "wall_s": wall, "budget": budget,
          "full_recipe": full, "run_folders": [str(f) for f in folders], **(extra or {})}


def scorer_rows(dataset: str, data: nextitem.NextItemData, sets: dict[str, list], name: str) -> list[dict]:
  out = []
  for users, xs in sets.items():
    t0 = time.time()
    scorer = baselines.popularity_scorer(data) if name == "popularity" else baselines.bm25_last_item_scorer(data)
    m = baselines.evaluate(scorer, data, xs)
    out.append(row(dataset, name, None, users, [m], {"eval": time.time() - t0}, {}, True))
  return out


def check_same_users(data: nextitem.NextItemData, seqs: sequences.SequenceData) -> None:
  """The ID encoder's sequences are the text data's histories, user for user, item for item."""
  if len(seqs.sequences) != len(data.histories) or any(
      tuple(s.tolist()) != h for s, h in zip(seqs.sequences, data.histories)):
    raise RuntimeError(f"{data.name}: sequences.load and nextitem.load disagree on users or item ids")


@functools.partial(jax.jit, static_argnames="graphdef")
def _id_scores(graphdef, state, items_bl):
  encoder = nnx.merge(graphdef, state)
  return encoder.encode(items_bl) @ encoder.item_table().T


def id_ranks(model: pretrain.NextItemRec, cfg: ConfigDict, xs: Sequence[nextitem.Example],
             batch: int = 512) -> np.ndarray:
  """0-based full-catalogue ranks of the targets under the encoder (history items kept, as for every row)."""
  if cfg.pooling != "last":
    raise ValueError(f"id_config.pooling={cfg.pooling!r}: the table scores the encoder's 'last' pooling")
  graphdef, state = nnx.split(model.encoder)
  ranks = []
  for start in range(0, len(xs), batch):
    part = list(xs[start:start + batch])
    part += [part[-1]] * (batch - len(part))  # one shape
    items_bl, _ = sequences.pad([np.asarray(ex.history) for ex in part], cfg.max_len)
    scores = np.asarray(_id_scores(graphdef, state, items_bl))[:, 1:-1]  # ids 1..N (drop padding and mask ids)
    n = min(batch, len(xs) - start)
    ranks.append(metrics.ranks_from_scores(scores[:n], [ex.target for ex in part[:n]]))
  return np.concatenate(ranks)


def id_rows(dataset: str, data: nextitem.NextItemData, sets: dict[str, list], args) -> list[dict]:
  overrides = common.parse_overrides(args["id_set"])
  cfg = id_config(args["id_config"], dataset, args["id_budget_min"], overrides)
  budget = {**({"time_budget_min": cfg.time_budget_min} if args["id_budget_min"] > 0 else {}), **overrides}
  folder = run_folder(args["workdir"], dataset, "id_encoder", budget)
  seqs = sequences.load(dataset)
  check_same_users(data, seqs)
  model = pretrain.NextItemRec(cfg, seqs)
  summary = trainer.run([pretrain.stage(cfg, model, seqs, folder)], model,
                        sharding.make_mesh(cfg.get("mesh", (-1, 1, 1))))[-1]
  out = []
  extra = {"steps_run": summary["steps"], "best_step": summary["best_step"], "stopped": summary["stopped"],
           "config": {k: cfg[k] for k in ("hidden", "num_layers", "max_len", "ce_negatives", "cl_weight",
                                          "dropout_cl_weight", "time_budget_min")}}
  for users, xs in sets.items():
    t0 = time.time()
    m = metrics.ranking_metrics(id_ranks(model, cfg, xs))
    out.append(row(dataset, "id_encoder", None, users, [m], {"train": summary["wall_s"], "eval": time.time() - t0},
                   budget, not budget, [folder], extra))
  return out


def llm_metrics(r: calrec.Run, folder: pathlib.Path, xs: Sequence[nextitem.Example], kind: str) -> dict:
  """Recall / NDCG of the model in `r` on `xs` by `kind`; generated texts go to FOLDER/eval/."""
  c, e = r.config, r.config.eval
  if kind == "dense":
    return calrec.dense_metrics(r, r.model, xs, folder)
  texts = calrec.generate_items(r.model.llm, r.tokenizer, r.target, xs, r.layout, num_samples=e.num_samples,
                                num_beams=e.num_beams, temperature=e.temperature, top_p=e.top_p,
                                key=jax.random.key(c.seed), batch_size=c.train.eval_batch_size,
                                tokens=r.tokens[r.target.name])
  lists = calrec.rankings_from_texts(r.target, xs, texts, exclude_history=e.exclude_history)
  (folder / "eval").mkdir(parents=True, exist_ok=True)
  lines = [json.dumps({"user": ex.user, "target": ex.target, "texts": t, "top10": lst[:10]})
           for ex, t, lst in zip(xs, texts, lists)]
  (folder / "eval" / f"table_test_{len(xs)}_generations.jsonl").write_text("".join(x + "\n" for x in lines))
  return calrec.list_metrics(lists, xs)


def llm_rows(dataset: str, name: str, users: str, xs: Sequence[nextitem.Example], args,
             datasets: dict[str, nextitem.NextItemData]) -> list[dict]:
  """The zero-shot row, or a CALRec run's rows (one per ranking kind) over the seeds."""
  overrides = common.parse_overrides(args["set"])
  steps = args["steps"] if name != "zero_shot" else -1
  seeds = [0] if name == "zero_shot" else args["seeds"]
  kinds = ["generation"] if name == "zero_shot" else args["calrec_eval"]
  budget = {**({"steps": steps} if steps >= 0 else {}), **overrides,
            **({"llm_users": len(xs)} if args["llm_users"] >= 0 else {})}
  per_kind = {k: [] for k in kinds}
  walls = {k: [] for k in kinds}
  folders, stages = [], []
  for seed in seeds:
    c = calrec_config(args["calrec_config"], dataset, name, seed, steps, overrides)
    folder = run_folder(args["workdir"], dataset, name, {k: v for k, v in budget.items() if k != "llm_users"})
    folder = folder / f"seed{seed}"
    if name == "zero_shot":
      train_s, stage_info = 0.0, []
    else:
      summary = calrec.train(c, folder)
      if summary.get("preempted"):
        raise RuntimeError(f"{folder}: training was preempted; run the command again to continue")
      train_s = sum(s["wall_s"] for s in summary["stages"])
      stage_info = summary["stages"]
    need, t_build = calrec.dataset_names(c), time.time()
    r = calrec.build(c, {n: datasets[n] for n in need})
    calrec.restore(r, folder)
    build_s = time.time() - t_build
    for kind in kinds:
      t1 = time.time()
      per_kind[kind].append(llm_metrics(r, folder, xs, kind))
      walls[kind].append({"train": train_s, "eval": time.time() - t1})
    folders.append(folder)
    stages.append({"seed": seed, "stages": stage_info, "build_and_restore_s": build_s})
    del r
  out = []
  for kind in kinds:
    wall = {part: float(np.mean([w[part] for w in walls[kind]])) for part in ("train", "eval")}
    extra = {"stages": stages, "eval_settings": dict(c.eval), "seed_list": seeds,
             "steps_per_stage": {"mixture": c.calrec.mixture.steps, "target": c.calrec.target.steps},
             "model": c.model.source or c.model.preset}
    out.append(row(dataset, name, None if name == "zero_shot" else kind, users, per_kind[kind], wall, budget,
                   not budget, folders, extra))
  if name == "zero_shot":
    out[0]["label"] = f"{LABELS[name]} ({KINDS['generation']})"
  return out


# --- Table ---------------------------------------------------------------------------------------

def key(r: dict) -> tuple:
  return (r["dataset"], r["row"], r.get("kind"), r["users"])


def merge(old: list[dict], new: list[dict]) -> list[dict]:
  keys = {key(r) for r in new}
  return [r for r in old if key(r) not in keys] + new


def fmt(r: dict, k: str) -> str:
  s = f"{r['mean'][k]:.4f}"
  return s + (f" ± {r['std'][k]:.4f}" if r["seeds"] > 1 else "")


def budget_text(r: dict) -> str:
  if r["full_recipe"]:
    return "as configured"
  return "**budget**: " + ", ".join(f"{k}={v}" for k, v in r["budget"].items())


def wall_text(r: dict) -> str:
  w = r["wall_s"]
  parts = [f"train {w['train'] / 60:.1f} min"] if w.get("train") else []
  return ", ".join(parts + [f"eval {w['eval'] / 60:.1f} min" if w["eval"] >= 60 else f"eval {w['eval']:.1f} s"])


def goal_lines(rows: list[dict]) -> list[str]:
  """Best CALRec row against the ID encoder on the same users, per dataset and user set."""
  lines = []
  for (dataset, users), group in common.group_by(rows, lambda r: (r["dataset"], r["users"])).items():
    ids = [r for r in group if r["row"] == "id_encoder"]
    cal = [r for r in group if r["row"].startswith("calrec")]
    if not ids or not cal:
      continue
    base = ids[0]["mean"]
    for metric, need in GOAL.items():
      best = max(cal, key=lambda r: r["mean"][metric])
      ratio = best["mean"][metric] / base[metric] if base[metric] > 0 else float("inf")
      verdict = "met" if ratio >= need else f"missed by {need - ratio:.2f}x ({ratio / need:.0%} of the goal)"
      lines.append(f"- {dataset}, {users} users: {metric} best CALRec row `{best['label']}` "
                   f"{best['mean'][metric]:.4f} ({budget_text(best)}) / ID encoder {base[metric]:.4f} = "
                   f"{ratio:.2f}x (goal {need}x): {verdict}")
  return lines


def markdown(result: dict) -> str:
  rows = result["rows"]
  lines = ["# Sequential recommendation: full-catalogue ranking on the leave-one-out test split", "",
           f"Machine: {common.machine_line(result['machine'])}.",
           "Every method of a table is scored on the same test users (leave-one-out: the last item is the target; "
           "every catalogue item competes, history items kept). CALRec rows: mean ± sample standard deviation "
           "over seeds. Wall time: training (mean over seeds) and this table's scoring, compiles included, on a CPU "
           "shared with other jobs (upper bounds). A row marked **budget** ran with settings other than its "
           "config's recipe (the values listed: fewer steps, users or history items, another time budget) and "
           "does not stand for the recipe.",
           "", "Commands:", ""]
  lines += [f"- `{c}`" for c in result["commands"]]
  for (dataset, users), group in common.group_by(rows, lambda r: (r["dataset"], r["users"])).items():
    lines += ["", f"## {dataset}: {group[0]['count']} test users ({users})", ""]
    table = [[r["label"], *(fmt(r, k) for k in METRICS), r["seeds"], wall_text(r), budget_text(r)] for r in group]
    lines.append(common.markdown_table(["method", *METRICS, "seeds", "wall time", "budget"], table))
  goals = goal_lines(rows)
  if goals:
    lines += ["", "## Goal: best CALRec row >= 1.37x Recall@1 and 1.24x NDCG@10 of the ID encoder, same users", "",
              *goals]
  ran = {(r["dataset"], r["row"]) for r in rows}
  missing = [f"{d} {n}" for d in DATASETS for n in ROWS if (d, n) not in ran]
  if missing:
    lines += ["", "Not run: " + ", ".join(missing) + "."]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
  a = parse_args(argv)
  args = vars(a)
  out_json = pathlib.Path(a.out) / f"{a.stem}.json"
  command = " ".join(["python", "benchmarks/seqrec_table.py", *(sys.argv[1:] if argv is None else argv)])
  new: list[dict] = []
  result: dict = {}
  llm = any(r.startswith("calrec") or r == "zero_shot" for r in a.rows)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # Beauty's 7 untitled items: said in docs/results.md
    datasets = {n: nextitem.load(n) for n in DATASETS if n in a.datasets or llm}  # CALRec's mixture reads both
  for dataset in a.datasets:
    data = datasets[dataset]
    sets = user_sets(data, PROTOCOL_USERS[dataset], a.llm_users, 0)
    llm_users = list(sets)[-1]  # the LLM budget's users when asked, else the table's
    for name in a.rows:
      t0 = time.time()
      if name in ("popularity", "bm25_last"):
        rows = scorer_rows(dataset, data, sets, name)
      elif name == "id_encoder":
        rows = id_rows(dataset, data, sets, args)
      else:
        rows = llm_rows(dataset, name, llm_users, sets[llm_users], args, datasets)
      print(f"[{dataset}] {name}: {time.time() - t0:.0f} s", flush=True)
      for r in rows:
        print(f"  {r['label']} ({r['users']}, {r['count']}): " + " ".join(f"{k} {fmt(r, k)}" for k in METRICS),
              flush=True)
      new += rows
      # Read again before each write: another command may be filling other rows of the same table meanwhile.
      old = json.loads(out_json.read_text()) if out_json.is_file() and not (a.fresh and len(new) == len(rows)) \
          else {"rows": [], "commands": []}
      result = {"machine": common.machine(), "loadavg": common.loadavg(), "rows": merge(old["rows"], new),
                "commands": list(dict.fromkeys(old["commands"] + [command]))}
      common.write_result(a.out, a.stem, result, markdown(result), echo=False)  # after every row
  print(markdown(result))
  return result


if __name__ == "__main__":
  cli.enable_compilation_cache()  # a rerun (another row, budget or seed) skips the SmolLM2 compiles paid before
  main()

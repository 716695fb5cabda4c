"""The candidate-ranking table (issue 49, item 4): LLaRA's 20-candidate task on the leave-one-out test split,
HitRatio@1 of the generated answer with 95% paired-bootstrap intervals against the text-only row and the ID encoder
(same users, same candidates), ValidRatio, the decoding-free HitRatio@1, wall time per row, and the issue's goal
checked per table (a dataset and a number of test users); markdown + JSON.

  python benchmarks/cand_table.py                                      # every row, both datasets, 3 seeds
  python benchmarks/cand_table.py --rows=id_encoder,text,unified --datasets=ml100k --seeds=0 --steps=20 --users=100

Rows (configs/cand_<dataset>.py, `--config`): `popularity` (candidates by their training interactions: no model),
`id_encoder` (the ID encoder the unified rows read, SASRec trained
with CL4SRec/CoSeRec losses, ranking the same candidates), `text` (text-only LoRA), `unified` (unified prompts:
text-only stage, then LoRA + projector with both InfoNCE terms and the curriculum), `unified_no_user_cl`,
`unified_no_item_cl`, `unified_no_curriculum`, and `text+<task>` / `unified+<task>` with an auxiliary task of Cao
et al. added alone (`mim`, `bpr`, `mlm`, at `--aux_ratio` of the rec prompts) or all together (`aux`). LLM rows run
`--seeds`; the interval resamples users (the same draw for both rows, each user's hit averaged over the seeds).

Budget: `--steps` (each stage's updates), `--users` (seeded test users), `--set` (config overrides) and
`--encoder_set` (the encoder's) shrink the recipe for a CPU; a row run with any of them is marked **budget** in the
markdown and `full_recipe: false` in the JSON. Results merge into `--out/<stem>.json` (a row replaces the one of
the same dataset, row and number of test users); `--fresh` starts it again. Run folders (resumable; a finished run
is read, not retrained) live under `--workdir`; the unified rows and `id_encoder` of a dataset share one encoder
pretraining, whatever `--steps` and `--users` say (only `--encoder_set` and `--set` give it another folder), and
the text-only row and the unified rows of one task mixture, budget and seed share one text-only training (the text
row's model, the unified rows' stage 1: `unified.text_workdir`), whatever `--users` says.
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import argparse
import importlib
import json
import pathlib
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from clclm_jax.data import nextitem
from clclm_jax.data import candidates as cand_data
from clclm_jax.seqrec import baselines
from clclm_jax.seqrec import candidates as cs
from clclm_jax.seqrec import unified
from clclm_jax.train import cli, sharding

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # configs/ and common.py
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DATASETS = ("ml100k", "beauty")
AUX = ("mim", "bpr", "mlm", "aux")
ROWS = ("popularity", "id_encoder", "text", "unified", "unified_no_user_cl", "unified_no_item_cl",
        "unified_no_curriculum", *(f"text+{t}" for t in AUX), *(f"unified+{t}" for t in AUX))
BASELINE = "text"
GOAL_HIT, GOAL_VALID = 0.46, 0.95  # LLaRA's MovieLens HitRatio@1 (.4526) rounded up, and its ValidRatio bar
LABELS = {"popularity": "popularity (training interactions)", "id_encoder": "ID encoder (SASRec, CL4SRec losses)",
          "text": "text-only LoRA",
          "unified": "unified prompts (both InfoNCE, curriculum)", "unified_no_user_cl": "unified, without user_cl",
          "unified_no_item_cl": "unified, without item_cl", "unified_no_curriculum": "unified, without curriculum",
          **{f"{p}+{t}": f"{'text-only' if p == 'text' else 'unified'} + {'all auxiliary tasks' if t == 'aux' else t}"
             for p in ("text", "unified") for t in AUX}}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  csv = lambda text: [x for x in text.split(",") if x]  # noqa: E731
  p.add_argument("--datasets", type=csv, default=list(DATASETS), help="datasets: ml100k, beauty")
  p.add_argument("--rows", type=csv, default=list(ROWS), help=f"rows to run: {', '.join(ROWS)}")
  p.add_argument("--seeds", type=lambda t: [int(x) for x in csv(t)], default=[0, 1, 2], help="seeds of LLM rows")
  p.add_argument("--config", default="cand_{dataset}", help="configs/<module> of the rows")
  p.add_argument("--aux_ratio", type=float, default=0.2, help="each added auxiliary task's ratio (rec: 1)")
  p.add_argument("--steps", type=int, default=-1, help="budget: updates of each stage (-1: the config's)")
  p.add_argument("--users", type=int, default=0, help="budget: this many seeded test users (0: the config's)")
  p.add_argument("--set", type=csv, default=[], help="budget: config overrides, key=value,...")
  p.add_argument("--encoder_set", type=csv, default=[], help="budget: encoder config overrides, key=value,...")
  p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
  p.add_argument("--workdir", default="runs/cand", help="root of the run folders (resumable)")
  p.add_argument("--out", default="benchmarks/results", help="folder for <stem>.json and <stem>.md")
  p.add_argument("--stem", default="cand_table", help="file name stem of the results")
  p.add_argument("--fresh", action="store_true", help="start the table again instead of merging into <stem>.json")
  args = p.parse_args(argv)
  unknown = (set(args.rows) - set(ROWS)) | (set(args.datasets) - set(DATASETS))
  if unknown:
    p.error(f"unknown {sorted(unknown)}: rows {ROWS}, datasets {DATASETS}")
  return args


# --- Configs and budgets -----------------------------------------------------------------------------

def budget_of(args: dict) -> dict[str, Any]:
  """What of the recipe a command changed (empty: the recipe as configured)."""
  b = {**({"steps": args["steps"]} if args["steps"] >= 0 else {}), **({"users": args["users"]} if args["users"] else {}),
       **common.parse_overrides(args["set"]), **{f"encoder.{k}": v for k, v in common.parse_overrides(args["encoder_set"]).items()}}
  return b


def run_folder(root: str, dataset: str, name: str, budget: dict, seed: int | None = None) -> pathlib.Path:
  """A run's folder: the budget is part of the name, so runs of other budgets never resume each other."""
  tag = "_".join(f"{k.replace('.', '-')}{v}" for k, v in sorted(budget.items())) or "recipe"
  tag = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in tag)
  folder = pathlib.Path(root) / dataset / name.replace("+", "_plus_") / tag
  return folder if seed is None else folder / f"seed{seed}"


def row_config(args: dict, dataset: str, name: str, seed: int) -> ConfigDict:
  """The config of one row and seed: the unified block on or off, one loss or the curriculum off, auxiliary tasks
  added; the budget on top; every unified row reads the dataset's one encoder folder."""
  module, _, variant = args["config"].format(dataset=dataset).partition(":")  # tiny_cand:unified
  c = importlib.import_module(f"configs.{module}").get_config(*([variant] if variant else []))
  c.data.dataset, c.seed = dataset, seed
  u = c.unified
  u.enabled = name.startswith("unified")
  u.encoder_overrides = {**u.encoder_overrides.to_dict(), **common.parse_overrides(args["encoder_set"])}
  # Test users touch no training, and the LLM's steps not the encoder's: one encoder for every such budget, and one
  # text-only stage per task mixture, budget and seed: the text-only row's training and the unified rows' stage 1
  # (their ablations differ in stage 2 only).
  budget = {k: v for k, v in budget_of(args).items() if k != "users"}
  u.encoder_workdir = str(run_folder(args["workdir"], dataset, "encoder",
                                     {k: v for k, v in budget.items() if k != "steps"}))
  prefix, _, task = name.partition("+")
  u.text_workdir = str(run_folder(args["workdir"], dataset, "+".join(["text_stage", *([task] if task else [])]),
                                  budget, seed))
  c.tasks.ratios.update({"rec": 1.0, "mim": 0.0, "bpr": 0.0, "mlm": 0.0})
  if task:
    c.tasks.ratios.update({t: args["aux_ratio"] for t in ("mim", "bpr", "mlm") if task in (t, "aux")})
  if prefix == "unified_no_user_cl":
    u.loss_weights.user_cl = 0.0
  elif prefix == "unified_no_item_cl":
    u.loss_weights.item_cl = 0.0
  elif prefix == "unified_no_curriculum":
    u.curriculum = False
  common.apply_overrides(c, common.parse_overrides(args["set"]))
  if args["steps"] >= 0:
    c.candidates.steps = u.steps = args["steps"]
  if args["users"]:
    c.data.test_size = args["users"]
  c.eval.generation = True  # the table's HitRatio@1 and ValidRatio are the generated answers'
  return c


# --- Rows --------------------------------------------------------------------------------------------

def answer_hits(folder: pathlib.Path) -> tuple[list[int], np.ndarray, np.ndarray]:
  """(users, hit [n], valid [n]) of a run's generated test answers (WORKDIR/eval/test_answers.jsonl: the candidate
  each answer names)."""
  rows = [json.loads(x) for x in (folder / "eval" / "test_answers.jsonl").read_text().splitlines()]
  return ([r["user"] for r in rows], np.asarray([r["named"] == r["target"] for r in rows], np.float64),
          np.asarray([r["named"] is not None for r in rows], np.float64))


def llm_row(args: dict, dataset: str, name: str, data: nextitem.NextItemData) -> dict:
  """A LoRA row over the seeds: its summaries, per-user hits (for the interval) and wall time."""
  runs, hits, valid, users = [], [], [], None
  for seed in args["seeds"]:
    c = row_config(args, dataset, name, seed)
    folder = run_folder(args["workdir"], dataset, name, budget_of(args), seed)
    t0 = time.time()
    summary = cs.train(c, folder, log=lambda _: None, data=data)
    if summary.get("preempted"):
      raise KeyboardInterrupt(f"{dataset} {name} seed {seed} was preempted: run the command again to continue")
    u, h, v = answer_hits(folder)
    if users is not None and u != users:
      raise RuntimeError(f"{dataset} {name}: seed {seed} answered other users than seed {args['seeds'][0]}")
    users = u
    hits.append(h)
    valid.append(v)
    # Every stage's training, over all the commands that ran it, then the test evaluation (a run finished before the
    # summary timed its test evaluation: the time of the command that finished it).
    wall = (sum(s["wall_s"] for s in summary["stages"]) + summary["test_s"] if "test_s" in summary
            else summary["wall_s"])
    runs.append({"seed": seed, "folder": str(folder), "wall_s": wall, "command_s": time.time() - t0,
                 "test": summary["test"], "stages": summary["stages"], "unified": summary.get("unified")})
  h, v = np.stack(hits), np.stack(valid)
  return {"users": users, "all_users": c.data.test_size < 0, "hits": h.tolist(), "metrics": {
      cs.HIT: float(h.mean()), cs.VALID: float(v.mean()),
      cs.SCORED: float(np.mean([r["test"][cs.SCORED] for r in runs])),
      f"{cs.HIT}_per_seed": h.mean(1).tolist()}, "wall_s": float(np.mean([r["wall_s"] for r in runs])), "runs": runs}


def encoder_row(args: dict, dataset: str, data: nextitem.NextItemData) -> dict:
  """The encoder the unified rows read, ranking each test user's candidates (its next-item scores)."""
  c = row_config(args, dataset, "unified", args["seeds"][0])
  t0 = time.time()
  mesh = sharding.make_mesh(c.mesh)
  encoder, cfg, summary = unified.pretrained_encoder(c, data, pathlib.Path(c.unified.encoder_workdir), mesh,
                                                     log=lambda _: None)
  xs = test_examples(c, data)
  row = ranking_row(c, xs, cs.encoder_scores(encoder, xs, pooling=cfg.pooling), t0)
  keep = ("steps", "best_step", "stopped", "wall_s", "valid_NDCG@10")
  return row | {"runs": [{"encoder": {k: summary.get(k) for k in keep}, "folder": c.unified.encoder_workdir}]}


def popularity_row(args: dict, dataset: str, data: nextitem.NextItemData) -> dict:
  """Each test user's candidates ranked by their count in the training histories: what a model must beat."""
  c, t0 = row_config(args, dataset, "text", args["seeds"][0]), time.time()
  xs = test_examples(c, data)
  return ranking_row(c, xs, cs.popularity_scores(data, xs), t0) | {"runs": []}


def test_examples(c: ConfigDict, data: nextitem.NextItemData) -> list:
  """The config's test users (all, or its seeded subset) with their candidates: the LLM rows' own."""
  xs = cand_data.candidate_examples(data, "test", num_candidates=c.data.num_candidates, seed=c.data.candidate_seed)
  return xs if c.data.test_size < 0 else baselines.sample_examples(xs, c.data.test_size, c.data.subset_seed)


def ranking_row(c: ConfigDict, xs: list, scores_uc: np.ndarray, t0: float) -> dict:
  """A row of a ranking without an answer to parse: its top candidate is its answer (ValidRatio 1)."""
  hit = (cs.target_ranks(scores_uc, xs) == 0).astype(np.float64)
  return {"users": [x.user for x in xs], "all_users": c.data.test_size < 0, "hits": [hit.tolist()],
          "metrics": {cs.HIT: float(hit.mean()), cs.VALID: 1.0, cs.SCORED: float(hit.mean())},
          "wall_s": time.time() - t0}


def paired_interval(hits_a: np.ndarray, hits_b: np.ndarray, *, resamples: int, seed: int = 0) -> dict:
  """HitRatio@1 of A minus B with a 95% interval: users resampled with replacement, the same draw for both rows;
  a user's hit is its mean over the row's seeds."""
  a, b = np.asarray(hits_a).mean(0), np.asarray(hits_b).mean(0)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(a), (resamples, len(a)))
  diffs = a[idx].mean(1) - b[idx].mean(1)
  lo, hi = np.percentile(diffs, [2.5, 97.5])
  return {"difference": float(a.mean() - b.mean()), "ci95": [float(lo), float(hi)], "resamples": resamples}


# --- Table -------------------------------------------------------------------------------------------

def group_key(r: dict) -> tuple[str, int]:
  """A table of the markdown: a dataset and a number of test users (a seeded subset of a size is always the same)."""
  return r["dataset"], r["count"]


def budget_part(r: dict, encoder: bool) -> tuple:
  """What of a row's budget its LLM (or, `encoder`, its ID encoder) trained with: rows compare only to baselines
  trained alike, and rows of other budgets stand beside each other rather than replace each other."""
  return tuple(sorted((k, v) for k, v in r["budget"].items() if k != "users" and k.startswith("encoder.") == encoder))


def row_key(r: dict) -> tuple:
  return *group_key(r), r["row"], budget_part(r, False), budget_part(r, True)


def interval_text(vs: dict | None) -> str:
  return f"{vs['difference']:+.4f} [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}]" if vs else ""


def goal_lines(rows: list[dict]) -> list[str]:
  """Issue 49's goals, per table. MovieLens: the best unified row's HitRatio@1 and ValidRatio against LLaRA's bar
  and its paired intervals against the text-only row and the ID encoder (both above zero). Beauty: each row with
  all auxiliary tasks against the text-only row (interval above zero)."""
  lines = []
  for (dataset, count), group in common.group_by(rows, group_key).items():
    if dataset == "ml100k" and (unified_rows := [r for r in group if r["row"].startswith("unified")]):
      best = max(unified_rows, key=lambda r: r["metrics"][cs.HIT])
      m = best["metrics"]
      checks = [f"HitRatio@1 {m[cs.HIT]:.4f} (goal >= {GOAL_HIT})",
                f"ValidRatio {m[cs.VALID]:.4f} (goal >= {GOAL_VALID})"]
      for key, name in (("vs_text", "text-only"), ("vs_id", "the ID encoder")):
        vs = best.get(key)
        checks.append(f"vs {name} {interval_text(vs)}" if vs else f"vs {name}: not run on these users")
      met = (m[cs.HIT] >= GOAL_HIT and m[cs.VALID] >= GOAL_VALID
             and all(best.get(k) and best[k]["ci95"][0] > 0 for k in ("vs_text", "vs_id")))
      lines.append(f"- {dataset}, {count} users, best unified row `{best['label']}`{budget_mark(best)}: "
                   + "; ".join(checks) + (": **met**" if met else ": missed"))
    for r in (r for r in group if dataset == "beauty" and r["row"].endswith("+aux")):
      vs = r.get("vs_text")
      verdict = "**met**" if vs and vs["ci95"][0] > 0 else "missed"
      lines.append(f"- {dataset}, {count} users, `{r['label']}`{budget_mark(r)} vs text-only: "
                   + (interval_text(vs) if vs else "text-only not run on these users") + f": {verdict}")
  return lines


def budget_mark(r: dict) -> str:
  return "" if r["full_recipe"] else " (**budget** row)"


def markdown(result: dict) -> str:
  lines = ["# Candidate ranking (LLaRA's task): HitRatio@1 on the leave-one-out test split", "",
           f"Machine: {common.machine_line(result['machine'])}.",
           "Every row of a table answers the same test users and the same candidates. HitRatio@1 and ValidRatio "
           "are the greedy answer's (mean over seeds); `vs text-only` and `vs ID encoder` are HitRatio@1 minus "
           "that row's (the text-only row of the same training budget; the ID encoder the row reads) with a 95% "
           "paired-bootstrap interval over users; `scored` is the decoding-free HitRatio@1 "
           "(log-likelihood of each candidate's title). Wall time: training (every stage, over all the commands "
           "that ran it) and test evaluation per seed (mean), "
           "on a CPU shared with other jobs (upper bounds). A row marked **budget** ran with settings other than "
           "its config's recipe and does not stand for it.", "", "Commands:", ""]
  lines += [f"- `{c}`" for c in result["commands"]]
  for (dataset, count), group in common.group_by(result["rows"], group_key).items():
    subset = "all" if group[0].get("all_users", "users" not in group[0]["budget"]) else "seeded"
    lines += ["", f"## {dataset}: {count} test users ({subset})", ""]
    table = []
    for r in group:
      m = r["metrics"]
      budget = "as configured" if r["full_recipe"] else "**budget**: " + ", ".join(
          f"{k}={v}" for k, v in r["budget"].items())
      table.append([r["label"], f"{m[cs.HIT]:.4f}", interval_text(r.get("vs_text")), interval_text(r.get("vs_id")),
                    f"{m[cs.VALID]:.4f}", f"{m[cs.SCORED]:.4f}", r["seeds"], f"{r['wall_s'] / 60:.1f} min", budget])
    lines.append(common.markdown_table(["row", "HitRatio@1", "vs text-only", "vs ID encoder", "ValidRatio",
                                        "scored", "seeds", "wall time", "budget"], table))
  goals = goal_lines(result["rows"])
  if goals:
    lines += ["", f"## Goals: MovieLens, a unified row with HitRatio@1 >= {GOAL_HIT}, ValidRatio >= {GOAL_VALID}, "
              "above text-only and the ID encoder; Beauty, all auxiliary tasks above text-only (intervals above zero)",
              "", *goals]
  ran = {(r["dataset"], r["row"]) for r in result["rows"]}
  missing = [f"{d} {n}" for d in DATASETS for n in ROWS if (d, n) not in ran]
  if missing:
    lines += ["", "Not run: " + ", ".join(missing) + "."]
  return "\n".join(lines) + "\n"


def with_intervals(rows: list[dict], resamples: int) -> list[dict]:
  """Each row's paired intervals against the text-only row of its LLM budget and the ID encoder of its encoder
  budget, in its table (the same users)."""
  for key, base_name, encoder in (("vs_text", BASELINE, False), ("vs_id", "id_encoder", True)):
    base = {(*group_key(r), budget_part(r, encoder)): r for r in rows if r["row"] == base_name}
    for r in rows:
      b = base.get((*group_key(r), budget_part(r, encoder)))
      r.pop(key, None)
      if b is not None and r is not b and r["users"] == b["users"]:
        r[key] = paired_interval(r["hits"], b["hits"], resamples=resamples)
  return rows


def main(argv: Sequence[str] | None = None) -> dict:
  a = parse_args(argv)
  args = vars(a)
  out_json = pathlib.Path(a.out) / f"{a.stem}.json"
  command = " ".join(["python", "benchmarks/cand_table.py", *(sys.argv[1:] if argv is None else argv)])
  budget = budget_of(args)
  result: dict = {}
  for dataset in a.datasets:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # Beauty's 7 untitled items: said in docs/results.md
      data = nextitem.load(dataset)
    for name in a.rows:
      t0 = time.time()
      row = {"id_encoder": encoder_row, "popularity": popularity_row}.get(name)
      r = row(args, dataset, data) if row else llm_row(args, dataset, name, data)
      r = {"dataset": dataset, "row": name, "label": LABELS[name], "count": len(r["users"]),
           "seeds": len(r["hits"]), "budget": budget, "full_recipe": not budget, **r}
      print(f"[{dataset}] {name}: {time.time() - t0:.0f} s, " + " ".join(
          f"{k} {v:.4f}" for k, v in r["metrics"].items() if isinstance(v, float)), flush=True)
      # Read again before each write: another command may be filling other rows of the same table meanwhile.
      old = json.loads(out_json.read_text()) if out_json.is_file() and not a.fresh else {"rows": [], "commands": []}
      a.fresh = False  # only the first write starts afresh
      rows = [x for x in old["rows"] if row_key(x) != row_key(r)] + [r]
      result = {"machine": common.machine(), "loadavg": common.loadavg(),
                "rows": with_intervals(rows, a.resamples),
                "commands": list(dict.fromkeys(old["commands"] + [command]))}
      common.write_result(a.out, a.stem, result, markdown(result), echo=False)  # after every row
  print(markdown(result))
  return result


if __name__ == "__main__":
  cli.enable_compilation_cache()  # a rerun (another row, budget or seed) skips the compiles paid before
  main()

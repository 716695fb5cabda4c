"""Few-shot TALLRec AUC grid: zero-shot, TALLRec-style LoRA and the fused model against TALLRec and a heuristic.

  python benchmarks/quality.py [--out benchmarks/results] [--fused RESULTS.json ...]

One source of truth for the model rows: they are read from `benchmarks/fused_quality.py`'s results.json files
(`zero_shot`; `text_only` = TALLRec-style LoRA, shown as `lora`; `fused` and its ablations; `residual`), by
default benchmarks/results/fused_quality (the soft-token grid) then residual_confirm (residual fusion with its
guard, the configs' recipe); a later file's rows replace an earlier file's rows of the same method, domain, shots
and test set (a newer measurement, e.g. the encoder alone after a change to its pretraining). Each row names the
fused_quality command that measured it. This script computes only what needs no model:
the history like-ratio heuristic, on the whole test sets and on every test subset the model rows used.
Writes quality.{json,md,png} into --out.
"""

from clclm_jax.train import malloc

if __name__ == "__main__":
  malloc.reexec_keeping_freed_memory()  # before the imports below, which a re-exec would pay twice

import argparse
import json
import pathlib
import statistics
import sys
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.data import fewshot, tallrec  # pylint: disable=wrong-import-position
from clclm_jax.train import evaluate  # pylint: disable=wrong-import-position

NAMES = {"tallrec_published": "TALLRec, published (LLaMA-7B)", "heuristic": "history like-ratio (no training)",
         "zero_shot": "ours, zero-shot", "encoder_only": "ours, pretrained encoder alone (no LLM)",
         "lora": "ours, TALLRec-style LoRA", "fused": "ours, fused (CLCLMRec)",
         "fused-seq_cl": "ours, fused - seq_cl", "fused-text_cl": "ours, fused - text_cl",
         "fused-pretrain": "ours, fused - encoder pretraining", "fused-hint": "ours, fused - answer hint",
         "fused-prompt_dropout": "ours, fused - encoder dropout under the soft tokens",
         "fused+align_cl": "ours, fused + align_cl", "fused+history_targets": "ours, fused + history targets",
         "fused+sharp_hint": f"ours, fused + hint from {common.SHARP_HINT_SCALE:g} x the encoder's logit",
         "fused+hint_kd": "ours, fused + hint distillation (hint_kd)",
         "fused+hint_kd+align_cl": "ours, fused + hint_kd + align_cl",
         "fused+align_cl-seq_cl": "ours, fused + align_cl - seq_cl",
         "fused+align_cl-text_cl": "ours, fused + align_cl - text_cl",
         "fused+hint_kd-seq_cl": "ours, fused + hint_kd - seq_cl",
         "fused+hint_kd-text_cl": "ours, fused + hint_kd - text_cl",
         "residual": "ours, residual fusion (encoder logit + LoRA's change)",
         "residual+gate": "ours, residual fusion + learned gates",
         "residual+soft_tokens": "ours, residual fusion + soft tokens",
         "residual+text_cl": "ours, residual fusion + text-view InfoNCE",
         "residual+align_cl": "ours, residual fusion + LLM-encoder alignment"}
VARIANT_PREFIXES = ("fused-", "fused+", "residual")  # the fused variants plotted beside the recipe
ABLATION_MARKERS = "v^x*hPXpD<>dH8+1234"  # one per fused variant, in NAMES order
FUSED_DEFAULT = [ROOT / "benchmarks" / "results" / name / "results.json"
                 for name in ("fused_quality", "residual_confirm")]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results", help="folder for quality.{json,md,png}")
  p.add_argument("--fused", nargs="+", default=[str(f) for f in FUSED_DEFAULT],
                 help="benchmarks/fused_quality.py results.json files; later files' rows replace earlier ones'")
  p.add_argument("--domains", nargs="+", default=["movie", "book"], choices=("movie", "book"))
  return p.parse_args(argv)


def test_set(domain: str, test_size: int, seed: int) -> tuple[list, dict[str, Any]]:
  """The test interactions (fused_quality's subset for this size and seed), and their description."""
  full = tallrec.tallrec_splits(domain).test
  if test_size <= 0 or test_size >= len(full):
    return full, {"test_n": len(full), "test_full_n": len(full), "subset": False, "subset_seed": None}
  return fewshot.fewshot(full, test_size, seed), {"test_n": test_size, "test_full_n": len(full), "subset": True,
                                                   "subset_seed": seed}


def heuristic_row(domain: str, test_size: int, seed: int) -> dict[str, Any]:
  xs, desc = test_set(domain, test_size, seed)
  return {"method": "heuristic", "domain": domain, "shots": 0, "seed": None, **desc,
          "auc": evaluate.like_ratio_auc(xs)}


def fused_rows(fused: dict[str, Any], domains: list[str], source: str) -> list[dict[str, Any]]:
  """fused_quality rows in this table's form (AUC as a fraction), each with the command that measured it and its
  run (`source` run i: the i-th run of that results file)."""
  rows = []
  for r in fused["rows"]:
    if r["domain"] not in domains or common.split_of(r) != "test":  # valid rows choose, test rows report
      continue
    subset = r["test_size"] < r["test_total"]
    rows.append({"method": "lora" if r["variant"] == "text_only" else r["variant"], "domain": r["domain"],
                 "shots": r["shots"], "seed": r["seed"], "test_n": r["test_size"], "test_full_n": r["test_total"],
                 "subset": subset, "subset_seed": r["test_seed"] if subset else None, "auc": r["auc"] / 100,
                 "steps": f"{r['stage1_steps']}+{r['stage2_steps']}", "batch_size": r["batch_size"],
                 "train_s": r["train_s"], "score_s": r["score_s"], "run": f"{source} run {r['run']}",
                 "command": fused["runs"][r["run"]]["command"]}
                | {k: v for k, v in fused["runs"][r["run"]].items() if k in ("stopped", "cpu")})
  return rows


def _cell(r: dict[str, Any]) -> tuple:
  """Rows of one method in one table cell on one test set (several seeds; untrained rows in every shots column)."""
  return r["method"], r["domain"], r["shots"], r["test_n"], r["subset_seed"]


def read_fused(paths: list[pathlib.Path], domains: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
  """The model rows of several fused_quality results files, a later file's replacing an earlier one's in the same
  cell; and the machine of the last file that has one."""
  rows, machine = [], None
  for path in paths:
    if not path.exists():
      continue
    fused = json.loads(path.read_text())
    mine = fused_rows(fused, domains, path.parent.name)
    cells = {_cell(r) for r in mine}
    rows = [r for r in rows if _cell(r) not in cells] + mine
    machine = fused.get("machine") or machine
  return rows, machine


def published_rows() -> list[dict[str, Any]]:
  return [{"method": "tallrec_published", "domain": d, "shots": s, "seed": None, "auc": v / 100,
           "test_n": None, "test_full_n": None, "subset": False, "subset_seed": None,
           "model": "LLaMA-7B (TALLRec paper)"} for d, by in common.TALLREC_PUBLISHED.items() for s, v in by.items()]


def test_label(r: dict[str, Any]) -> str:
  if r["test_n"] is None:
    return "paper's test set"
  if r["subset"]:
    return f"SUBSET {r['test_n']}/{r['test_full_n']} (seed {r['subset_seed']})"
  return f"full ({r['test_n']})"


def auc_table(rows_in: list[dict[str, Any]]) -> str:
  """One markdown row per (domain, method, shots, steps, test set): mean AUC x100 (± std over seeds)."""
  groups = common.group_by(rows_in, lambda r: (r["domain"], r["method"], r["shots"], r.get("steps", ""),
                                               r["test_n"], r["subset"]))
  order = {m: i for i, m in enumerate(NAMES)}
  rows = []
  for key in sorted(groups, key=lambda k: (k[0], order[k[1]], k[2], k[3], k[4] or 0)):
    rs = groups[key]
    aucs = [100 * r["auc"] for r in rs]
    seeds = ",".join(str(r["seed"]) for r in rs if r["seed"] is not None) or "-"
    notes = ""
    if "run" in rs[0]:
      minutes = statistics.mean(r["train_s"] + r["score_s"] for r in rs) / 60
      runs = ", ".join(sorted({r["run"] for r in rs}))
      notes = f"{minutes:.1f} min per seed (train + score), {runs}"
    rows.append([key[0], NAMES[key[1]], key[2] or "-", key[3] or "-", seeds, test_label(rs[0]),
                 common.mean_std(aucs), notes])
  return common.markdown_table(["domain", "method", "shots", "steps", "seeds", "test set",
                                "AUC x100 (± std of seeds)", "notes"], rows)


GOAL_CAPTION = ("Issue 5's goals against every fused setting (`fused`, its `fused+...` additions and the recipes "
                "with a part removed) run with 3 or more seeds on the whole test set (subset rows are in the "
                "next table); ± is the seeds' standard "
                "deviation, 'within noise': the gap is under one standard error of their mean:")


def versus_goal(aucs: list[float], goal: float) -> str:
  """The signed gap of the seeds' mean to the goal, 'within noise' when it is under one standard error."""
  mean, std = common.mean_and_std(aucs)
  gap = mean - goal
  noise = ", within noise" if abs(gap) < std / len(aucs) ** 0.5 else ""
  return f"{gap:+.2f} ({'met' if gap >= 0 else 'missed'}{noise})"


def goal_table(rows_in: list[dict[str, Any]]) -> str:
  """Issue 5's goals against every fused setting (`fused` and its `fused+...` variants, not `fused-...` ablations)
  measured with 3 or more seeds on the whole test set, the goals' protocol: mean AUC x100 and the gap."""
  groups = common.group_by((r for r in rows_in if (r["method"] == "fused" or r["method"].startswith("fused+"))
                            and not r["subset"]),
                           lambda r: (r["domain"], r["shots"], r["test_n"], r["steps"], r["method"]))
  order = {m: i for i, m in enumerate(NAMES)}
  rows = []
  for domain, by_shots in common.FUSED_GOALS.items():
    for shots, goal in by_shots.items():
      keys = [k for k in groups if k[:2] == (domain, shots) and len(groups[k]) >= 3]
      if not keys:
        rows.append([domain, shots, goal, common.TALLREC_PUBLISHED[domain][shots], "-", "-", "-",
                     "not measured on the whole test set", "-"])
      for key in sorted(keys, key=lambda k: (k[3], order[k[4]])):
        aucs = [100 * r["auc"] for r in groups[key]]
        rows.append([domain, shots, goal, common.TALLREC_PUBLISHED[domain][shots], test_label(groups[key][0]),
                     key[3], key[4], common.mean_std(aucs), versus_goal(aucs, goal)])
  return common.markdown_table(["domain", "shots", "goal", "TALLRec 7B", "test set", "steps", "variant",
                                "AUC x100, mean ± std of seeds", "vs goal"], rows)


ISSUE_ROWS = (  # (label, variant by domain): issue 5's table; the recipe is configs/<domain>.py
    ("zero-shot", dict.fromkeys(common.RECIPES, "zero_shot")),
    ("history like-ratio (no training)", dict.fromkeys(common.RECIPES, "heuristic")),
    ("TALLRec-style LoRA, text only", dict.fromkeys(common.RECIPES, "lora")),
    ("pretrained encoder alone (no LLM)", dict.fromkeys(common.RECIPES, "encoder_only")),
    ("CLCLMRec, the config's recipe (residual fusion)", common.RECIPES),
    ("soft-token fusion (configs/<domain>_soft_tokens.py)", common.SOFT_TOKEN_RECIPES),
    # Book's soft-token recipe has text_cl off: its rows below are measured with text_cl on.
    ("soft-token recipe - seq_cl (book: + text_cl)",
     {"movie": "fused+align_cl-seq_cl", "book": "fused+hint_kd-seq_cl"}),
    ("soft-token recipe, text_cl switched (movie: off, book: on)",
     {"movie": "fused+align_cl-text_cl", "book": "fused+hint_kd"}),
    ("plain fused (no align_cl, no hint_kd)", dict.fromkeys(common.RECIPES, "fused")),
)
ISSUE_CAPTION = ("Issue 5's table, whole test sets only (the goals' protocol): mean ± std of seeds (number of "
                 "seeds, steps s1+s2); where a row has several step settings, the cell shows the one with the most "
                 "seeds, then the most steps; '-': not run on the whole test set (subset runs are under All rows). "
                 "The recipe is each domain's config (configs/<domain>.py): `" + common.RECIPES["movie"] + "`; the "
                 "soft-token recipe (configs/<domain>_soft_tokens.py): movie `" + common.SOFT_TOKEN_RECIPES["movie"]
                 + "`, book `" + common.SOFT_TOKEN_RECIPES["book"] + "`.")


def _steps_total(steps: str) -> int:
  return sum(int(s) for s in steps.split("+"))


README_ROWS = 6  # the README's table: the rows up to the soft-token recipe (ablations: docs/results.md)


def issue_table(rows_in: list[dict[str, Any]], num_rows: int | None = None) -> str:
  """Issue 5's table in its own layout: a row per method, a column per (domain, shots), whole test sets only;
  `num_rows`: only the first rows of `ISSUE_ROWS`, without the goal row."""
  groups = common.group_by((r for r in rows_in if not r["subset"] and r["method"] != "tallrec_published"),
                           lambda r: (r["method"], r["domain"], r["shots"], r.get("steps", "")))
  cells = [(d, s) for d, by in common.FUSED_GOALS.items() for s in by]

  def cell(method: str, domain: str, shots: int) -> tuple[list[float], str, bool] | None:
    """(AUCs x100, steps, trained) of the group with the most seeds, then the most steps (untrained: shots 0)."""
    keys = [k for k in groups if k[:2] == (method, domain) and k[2] in (shots, 0)]
    if not keys:
      return None
    key = max(keys, key=lambda k: (len(groups[k]), _steps_total(k[3] or "0")))
    return [100 * r["auc"] for r in groups[key]], key[3], groups[key][0]["seed"] is not None

  def text(found: tuple[list[float], str, bool] | None) -> str:
    if found is None:
      return "-"
    aucs, steps, trained = found
    return common.mean_std(aucs) + (f" ({len(aucs)} seed{'s' * (len(aucs) > 1)}, {steps})" if trained else "")

  table = [["TALLRec, LLaMA-7B (published)", *(common.TALLREC_PUBLISHED[d][s] for d, s in cells)]]
  if num_rows is None:
    table.append(["goal for the fused model", *(f">= {common.FUSED_GOALS[d][s]}" for d, s in cells)])
  for label, by_domain in ISSUE_ROWS[:num_rows]:
    found = [cell(by_domain[d], d, s) for d, s in cells]
    table.append([label, *map(text, found)])
    if by_domain is common.RECIPES and num_rows is None:
      table.append(["recipe vs goal", *(versus_goal(f[0], common.FUSED_GOALS[d][s]) if f and len(f[0]) >= 3
                                         else "-" for f, (d, s) in zip(found, cells))])
  return common.markdown_table(["", *(f"{d} {s}" for d, s in cells)], table)


def sources(result: dict[str, Any]) -> list[str]:
  """The commands behind the model rows, by results file and run number."""
  def order(run: str) -> tuple[str, int]:
    source, number = run.rsplit(" ", 1)
    return source, int(number)
  runs = sorted({(r["run"], r["command"], r.get("stopped", ""), r.get("cpu", ""))
                 for r in result["rows"] if "run" in r}, key=lambda x: order(x[0]))
  return [f"- {run}: `{cmd}`" + (f" on {cpu}" if cpu else "")
          + (f" ({common.stopped_note(why)})" if why else "") for run, cmd, why, cpu in runs]


def machine_note(machine: dict[str, Any]) -> str:
  """Where the model rows ran: the latest run's machine; each run's CPU follows its command."""
  return (f"the latest model run measured on {common.machine_line(machine)}; earlier runs used shared machines "
          "of the same size, each run's CPU (where recorded) follows its command")


def markdown(result: dict[str, Any]) -> str:
  model_machine = result.get("model_machine")
  lines = ["# Few-shot TALLRec AUC (x100)", "",
           f"Model rows: {result['model']}, int8 base, LoRA r=8, alpha 16, dropout 0.05 on q, v; "
           f"batch {', '.join(sorted({str(r['batch_size']) for r in result['rows'] if 'batch_size' in r})) or '-'}; "
           "steps `s1+s2` = stage-1 text-only LoRA steps + stage-2 fused steps (`lora` rows stop after stage 1). "
           "Rows marked SUBSET score a seeded subset of the test set, not the whole of it; they are not "
           "directly comparable with full-test rows. Minutes are wall clock on the shared machine, XLA compiles "
           "included.", ""]
  if model_machine:
    lines += [f"Model rows: {machine_note(model_machine)}. Produced by "
              "`benchmarks/fused_quality.py` (its results.json is the source of these rows):", "",
              *sources(result), ""]
  lines += [f"Heuristic rows and these tables: `python benchmarks/quality.py` on "
            f"{common.machine_line(result['machine'])}.", "",
            ISSUE_CAPTION, "", issue_table(result["rows"]), "",
            GOAL_CAPTION, "",
            goal_table(result["rows"]), "",
            "All rows:", "", auc_table(result["rows"]), ""]
  return "\n".join(lines) + "\n"


def _by_shots(rows: list[dict[str, Any]], method: str) -> dict[str, list[tuple]]:
  """{test label: [(shots, mean AUC x100, std, seeds)]} for one method."""
  untrained = method in ("zero_shot", "encoder_only")
  label = lambda r: test_label(r) + (f", {r['steps']} steps" if r.get("steps") and not untrained else "")  # noqa: E731
  groups = common.group_by((r for r in rows if r["method"] == method), lambda r: (label(r), r["shots"]))
  out: dict[str, list[tuple]] = {}
  for (name, shots), rs in sorted(groups.items()):
    out.setdefault(name, []).append((shots, *common.mean_and_std([100 * r["auc"] for r in rs]), len(rs)))
  return out


def plot(result: dict[str, Any], path: pathlib.Path) -> pathlib.Path:
  """AUC against training shots per domain: TALLRec's curve, issue 5's goals, our LoRA and fused curves, flat
  lines for the rest; only whole-test-set rows where a domain has any (subset rows are in the tables)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  domains = [d for d in ("movie", "book") if any(r["domain"] == d for r in result["rows"])]
  fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 3.6), squeeze=False)
  for ax, domain in zip(axes[0], domains):
    rows = [r for r in result["rows"] if r["domain"] == domain]
    full = [r for r in rows if r["test_n"] is None or not r["subset"]]
    whole = any(r["method"] not in ("tallrec_published", "heuristic") for r in full)
    rows = full if whole else rows
    pub = sorted((r["shots"], 100 * r["auc"]) for r in rows if r["method"] == "tallrec_published")
    ax.plot(*zip(*pub), "o-", color="tab:gray", label="TALLRec published (LLaMA-7B)")
    goals = sorted(common.FUSED_GOALS[domain].items())
    ax.plot(*zip(*goals), "k*--", ms=9, label="issue 5's goal for the fused model")
    for method, styles, color in (("heuristic", ("--", "-."), "saddlebrown"), ("zero_shot", (":",), "tab:orange"),
                                  ("encoder_only", ("--",), "tab:olive")):
      for i, (label, pts) in enumerate(_by_shots(rows, method).items()):
        ax.axhline(pts[0][1], ls=styles[i % len(styles)], color=color,
                   label=f"{NAMES[method].split(', ')[-1]}, {label}")
    ablations = [m for m in NAMES if m.startswith(VARIANT_PREFIXES)]
    styles = [("lora", "s", "tab:blue"), ("fused", "D", "tab:red")] + [
        (m, ABLATION_MARKERS[i], f"C{(i + 4) % 10}") for i, m in enumerate(ablations)]
    for method, marker, color in styles:
      curves = _by_shots(rows, method)
      # Filled and solid: a whole-test-set curve before subset ones, then the most shot counts, then seeds.
      main = max(curves, key=lambda k: (k.startswith("full"), len(curves[k]), sum(p[3] for p in curves[k])),
                 default=None)
      for label, pts in curves.items():
        shots, mean, std, _ = zip(*pts)
        ax.errorbar(shots, mean, yerr=std if any(std) else None, fmt=marker, color=color, capsize=3,
                    ls="-" if label == main else ":", mfc=color if label == main else "none",
                    label=f"{NAMES[method]}, {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks([16, 64, 256], ["16", "64", "256"])
    ax.set_xlabel("training shots")
    ax.set_ylabel("test AUC x100")
    ax.set_title(f"{domain}, {'whole test set' if whole else 'test subsets'}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
  fig.subplots_adjust(wspace=0.25)  # no tight_layout: it would shrink the axes to fit the legends below
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  fused_paths = [pathlib.Path(f) for f in args.fused]
  model_rows, model_machine = read_fused(fused_paths, args.domains)
  rows = [r for r in published_rows() if r["domain"] in args.domains]
  for domain in args.domains:
    rows.append(heuristic_row(domain, -1, 0))
    for test_n, seed in sorted({(r["test_n"], r["subset_seed"]) for r in model_rows
                                if r["domain"] == domain and r["subset"]}):
      rows.append(heuristic_row(domain, test_n, seed))
  result = {"machine": common.machine(), "model": "smollm2-135m-instruct", "model_machine": model_machine,
            "fused_results": [str(f) for f in fused_paths], "rows": rows + model_rows}
  common.write_result(out, "quality", result, markdown(result), echo=False)
  plot(result, out / "quality.png")
  print(markdown(result))
  return result


if __name__ == "__main__":
  main()

"""Rewrites the results sections of README.md (the short one: the quality table and the speed table) and
docs/results.md (every grid) from benchmarks/results/*.json.

  python benchmarks/readme_results.py [--results benchmarks/results] [--readme README.md] [--docs docs/results.md]

Only the text between `<!-- results:start -->` and `<!-- results:end -->` changes; the markers are
appended to a file when absent.
"""

import argparse
import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

START, END = "<!-- results:start -->", "<!-- results:end -->"


def throughput_section(result: dict, md_name: str) -> list[str]:
  from throughput import (FLOPS_NOTE, goal_table, llama7b_lines, missed_goal_note, probed_peaks_line,  # pylint: disable=g-import-not-at-top
                          run_table)
  peak = result["matmul_peak"]
  peaks = {p["dtype"]: p["flop_per_s"] for p in [peak] + result.get("more_peaks", [])}
  lines = [f"### Speed: clclm-jax vs transformers + PEFT ({result['tag']})", "",
           f"{common.machine_line(result['machine'])}. Load average before / after the run: "
           f"{result['loadavg_before'][0]:.1f} / {result['loadavg_after'][0]:.1f} on "
           f"{result['machine']['cores']} cores (the systems alternate, medians reported; on a loaded CPU torch suffers more, so idle "
           "runs give the fair ratio). "
           "Matmul peaks measured before the run: " + ", ".join(f"{p['dtype']} {common.si(p['flop_per_s'], 'FLOP/s')}"
                                                 for p in [peak] + result.get("more_peaks", [])) + ". "
           f"Details: [{md_name}](benchmarks/results/{md_name}).", ""]
  for run in result["runs"]:
    lines += [f"{run['model']}, {run['device']} {run['dtype']} (ours: {run['ours_storage']}; transformers: "
              f"{run['transformers_storage']}):", "", run_table(run, peaks), "", *probed_peaks_line(run),
              goal_table(run), ""]
  if result.get("llama7b"):
    lines += llama7b_lines(result["llama7b"], heading="####")
  return lines + [FLOPS_NOTE] + missed_goal_note(result, "benchmarks/results/") + [""]


def quality_section(result: dict) -> list[str]:
  from quality import (GOAL_CAPTION, ISSUE_CAPTION, auc_table, goal_table, issue_table,  # pylint: disable=g-import-not-at-top
                       machine_note, sources)
  machine = result.get("model_machine") or result["machine"]
  lines = ["### Few-shot TALLRec AUC", "",
           f"Model rows: {machine_note(machine)} below; model {result['model']}, int8 base, LoRA r=8 on q, v. "
           "Zero-shot, LoRA and fused rows come from `benchmarks/fused_quality.py` (commands below); "
           "SUBSET rows score a seeded subset of the test set (the CPU cannot run the whole grid); "
           "they are not directly comparable with full-test rows. Details: "
           "[quality.md](benchmarks/results/quality.md).", "", ISSUE_CAPTION, "", issue_table(result["rows"]), "",
           GOAL_CAPTION, "", goal_table(result["rows"]), ""]
  if (HERE / "results" / "quality.png").exists():
    lines += ["![AUC against training shots, whole test sets](benchmarks/results/quality.png)", ""]
  lines += ["All rows:", "", auc_table(result["rows"]), ""]
  if sources(result):
    lines += sources(result) + [""]
  return lines


def _body(md: str) -> str:
  return md.split("\n", 2)[2].strip()  # a results .md without its title


def label_signal_section(md: str) -> list[str]:
  """benchmarks/label_signal.py's table: how much of each label the prompt's structure predicts, no LLM."""
  return ["### What predicts a TALLRec label without tuning a language model", "",
          "A yardstick for the goals above: the history like-ratio, item and author priors and title overlap need "
          "no language model; the fused recipe's pretrained encoder and SmolLM2's own view of the titles (its "
          "hidden states, untuned) need no tuning of one. On movie the encoder knows more than the like-ratio "
          "(rank correlation 0.7) and a regression over all signals reaches 78; on book the encoder is the "
          "like-ratio again (0.94), the LLM's title similarity scores 65.6 alone but adds nothing to it, and the "
          "book goals (71/72/74) are above a logistic regression over all of them even when it is fitted on the "
          "whole book pool.", "", _body(md), ""]


def memory_plan_section(md: str) -> list[str]:
  """benchmarks/memory_plan.py's table: the compiler's memory plan of the train step, per shape and remat."""
  return ["### Train-step memory (compiled plan)", "", _body(md), ""]


METRICS = ("HR@5", "HR@10", "NDCG@5", "NDCG@10")


def pretrain_section(paths: list[pathlib.Path]) -> list[str]:
  """Leave-one-out full-ranking test metrics per dataset, with the published reference rows."""
  if not paths:
    return []
  rows = []
  for path in paths:
    r = json.loads(path.read_text())
    cmd = f"`{r['command']}`" if "command" in r else "not recorded (an older run)"
    details = f"[{path.with_suffix('.md').name}](benchmarks/results/{path.with_suffix('.md').name})"
    notes = f"{cmd}; best epoch {r['best_epoch']}, {r['train_seconds'] / 60:.1f} min; {details}"
    rows += [[r["dataset"], label, *(f"{test[m]:.4f}" for m in METRICS), notes if i == 0 else "same parameters"]
             for i, (label, test) in enumerate(common.encoder_test_rows(r))]
    rows += [[r["dataset"], f"{name} (FEARec re-report)", "-", f"{ref['HR@10']:.4f}", "-", f"{ref['NDCG@10']:.4f}", ""]
             for name, ref in r.get("reference", {}).items()]
  return ["### Encoder pretraining", "",
          "The sequence encoder alone (next-item CE + InfoNCE over augmented views), leave-one-out, full ranking "
          "over all items, on this project's 2-core CPU:", "",
          common.markdown_table(["dataset", "model", *METRICS, "command / notes"], rows), ""]


GENERATED = ("_Generated by `python benchmarks/readme_results.py` from `benchmarks/results/*.json`; "
             "do not edit by hand._")
README_SPEED = "throughput_cpu_epyc.json"  # the README's speed table: this project's own 2-core machine


def section(results: pathlib.Path) -> str:
  """docs/results.md's generated part: every table."""
  lines = [GENERATED, ""]
  for path in sorted(results.glob("throughput_*.json")):
    lines += throughput_section(json.loads(path.read_text()), path.with_suffix(".md").name)
  for path in sorted(results.glob("memory_plan_*.md")):
    lines += memory_plan_section(path.read_text())
  if (results / "quality.json").exists():
    lines += quality_section(json.loads((results / "quality.json").read_text()))
  if (results / "label_signal.md").exists():
    lines += label_signal_section((results / "label_signal.md").read_text())
  lines += pretrain_section(sorted(results.glob("pretrain_*.json")))
  return "\n".join(lines).rstrip() + "\n"


def readme_section(results: pathlib.Path) -> str:
  """The README's generated part: the few-shot AUC table up to the recipe and one speed table."""
  from quality import README_ROWS, issue_table  # pylint: disable=g-import-not-at-top
  short = lambda m: f"{m['cpu']}, {m['cores']} cores, jax {m['versions']['jax']}"  # noqa: E731
  from throughput import goal_table, run_table  # pylint: disable=g-import-not-at-top
  lines = [GENERATED, ""]
  if (results / "quality.json").exists():
    q = json.loads((results / "quality.json").read_text())
    lines += ["### Few-shot AUC (x100, whole test sets)", "",
              f"SmolLM2-135M-Instruct, int8 base, LoRA r=8 on q, v; mean ± std of the seeds (how many, steps of "
              f"stage 1 + stage 2); residual fusion keeps a trained step only if it beats the encoder on the whole "
              f"validation split, so it can score exactly as the encoder; latest run on "
              f"{short(q.get('model_machine') or q['machine'])}. Made by "
              "`benchmarks/fused_quality.py` then `benchmarks/quality.py`; every variant, ablation and subset "
              "run: [docs/results.md](docs/results.md).", "", issue_table(q["rows"], README_ROWS), ""]
  if (path := results / README_SPEED).exists():
    r = json.loads(path.read_text())
    peaks = {p["dtype"]: p["flop_per_s"] for p in [r["matmul_peak"]] + r.get("more_peaks", [])}
    lines += ["### Speed against transformers + PEFT", "",
              f"{short(r['machine'])}; `python benchmarks/throughput.py --tag {r['tag']}`, the "
              "systems alternating, medians. Other machines and the memory plan: "
              "[docs/results.md](docs/results.md).", ""]
    for run in r["runs"]:
      lines += [run_table(run, peaks), "", goal_table(run), ""]
  return "\n".join(lines).rstrip() + "\n"


def replace_between_markers(text: str, body: str) -> str:
  """`text` with the part between the markers replaced by `body` (markers appended when absent)."""
  if START not in text or END not in text:
    text = text.rstrip("\n") + f"\n\n{START}\n{END}\n"
  head, rest = text.split(START, 1)
  _, tail = rest.split(END, 1)
  return f"{head}{START}\n{body}{END}{tail}"


def _rewrite(path: pathlib.Path, body: str) -> str:
  text = replace_between_markers(path.read_text() if path.exists() else "", body)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".md.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
  return text


def main(argv: list[str] | None = None) -> str:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--results", default=str(HERE / "results"))
  p.add_argument("--readme", default=str(HERE.parent / "README.md"))
  p.add_argument("--docs", default=str(HERE.parent / "docs" / "results.md"))
  args = p.parse_args(argv)
  results = pathlib.Path(args.results)
  _rewrite(pathlib.Path(args.docs), section(results).replace("](benchmarks/", "](../benchmarks/"))  # docs/ links
  return _rewrite(pathlib.Path(args.readme), readme_section(results))


if __name__ == "__main__":
  main()

"""WORKDIR/eval/<split>_predictions.jsonl (P(Yes) per scored prompt) and <split>_metrics.json, and paired
comparisons of two runs by their predictions."""

import json
import pathlib

import numpy as np

from clclm_jax.train import checkpoint, evaluate
from clclm_jax.train.errors import ConfigError


def write(workdir: pathlib.Path, split: str, records: np.ndarray, labels: np.ndarray,
          p_yes: np.ndarray) -> pathlib.Path:
  """WORKDIR/eval/<split>_predictions.jsonl, one row per scored prompt in record order (`record`: its index
  in the split, `label`, `p_yes`): for paired comparisons of runs; written whole or not at all."""
  path = workdir / "eval" / f"{split}_predictions.jsonl"
  path.parent.mkdir(parents=True, exist_ok=True)
  order = np.argsort(records, kind="stable")
  rows = (json.dumps({"record": int(records[i]), "label": int(labels[i]), "p_yes": float(p_yes[i])}) for i in order)
  return checkpoint.write_text(path, "".join(r + "\n" for r in rows))


def write_metrics(workdir: pathlib.Path, split: str, metrics: dict) -> pathlib.Path:
  """WORKDIR/eval/<split>_metrics.json, written whole or not at all."""
  path = workdir / "eval" / f"{split}_metrics.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  return checkpoint.write_text(path, json.dumps(metrics, indent=2) + "\n")


def read(workdir: str | pathlib.Path, split: str) -> dict[int, tuple[int, float]]:
  """{record: (label, P(Yes))} from WORKDIR/eval/<split>_predictions.jsonl (`write`)."""
  path = pathlib.Path(workdir) / "eval" / f"{split}_predictions.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: score that run first (python eval.py --config=... "
                            f"--workdir={workdir} --split={split})")
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return {r["record"]: (r["label"], r["p_yes"]) for r in rows}


def compare(workdir_a: str | pathlib.Path, workdir_b: str | pathlib.Path, split: str = "test",
            resamples: int = 1000) -> dict:
  """`evaluate.paired_bootstrap` of two runs' predictions on `split`; they must have scored the same prompts."""
  a, b = read(workdir_a, split), read(workdir_b, split)
  if a.keys() != b.keys() or any(a[k][0] != b[k][0] for k in a):
    raise ConfigError(f"{workdir_a} and {workdir_b} scored different {split} prompts ({len(a)} and {len(b)}): "
                      f"score both with the same data.domain, data.{split}_size, data.fewshot_seed and data files")
  records = sorted(a)
  labels, p_a, p_b = (np.array([run[k][j] for k in records]) for run, j in ((a, 0), (a, 1), (b, 1)))
  return {"split": split, "a": str(workdir_a), "b": str(workdir_b),
          **evaluate.paired_bootstrap(p_a, p_b, labels, resamples=resamples)}


def format_comparison(c: dict) -> str:
  """Two lines for the terminal: both AUCs, then the difference and its interval."""
  lo, hi = c["ci95"]
  return (f"{c['split']} AUC  A {c['auc_a']:.4f} ({c['a']})  B {c['auc_b']:.4f} ({c['b']})\n"
          f"A - B {c['difference']:+.4f}, 95% interval {lo:+.4f} .. {hi:+.4f} (paired bootstrap over {c['n']} "
          f"prompts, {c['resamples']} resamples; A not better in {100 * c['share_a_not_better']:.1f}% of them)")

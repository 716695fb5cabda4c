"""What a short text-only LoRA stage learns: AUC, mean P(Yes) per label, before and after, on the few-shot
pool it trains on and on the test subset fused_quality.py scores (the label prior vs a ranking), and
which prompt features P(Yes) follows (rank correlation with prompt length, liked and disliked counts).

  python benchmarks/probe_text_only.py --domain movie --shots 16 --seed 0 --steps 8
"""

import tempfile
import pathlib
import argparse

import numpy as np

from fused_quality import CONFIGS, test_subset

from clclm_jax.contrastive import recipe
from clclm_jax.data import fewshot, prompts
from clclm_jax.train import evaluate


def prompt_features(xs, r) -> dict[str, np.ndarray]:
  """Per prompt: its token count, liked and disliked history items, and the liked share."""
  tokens = [len(r.tokenizer.encode(prompts.render_tallrec(x, r.splits.catalogue, r.config.data.domain))) for x in xs]
  likes = np.array([sum(x.history_likes) for x in xs], float)
  n = np.array([len(x.history_likes) for x in xs], float)
  return {"tokens": np.array(tokens, float), "likes": likes, "dislikes": n - likes,
          "like share": likes / np.maximum(n, 1)}


def rank_corr(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman's rho (average ranks for ties); nan when either side is constant (rho is undefined)."""
  def ranks(v):
    _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts - 1) / 2)[inv]
  ra, rb = ranks(a), ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--domain", default="movie", choices=["movie", "book"])
  parser.add_argument("--shots", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--lr", type=float, default=-1, help="< 0: the config's")
  parser.add_argument("--test_size", type=int, default=128)
  args = parser.parse_args()
  config = CONFIGS[args.domain].get_config()
  config.fusion.pretrain.epochs = 0  # text-only prompts never read the encoder
  if args.lr > 0:
    config.optim.lr = args.lr
  r = recipe.build(config)
  sets = {"pool": fewshot.fewshot(r.splits.train, args.shots, args.seed),
          "test": test_subset(r.splits, args.test_size)}

  features = {name: prompt_features(xs, r) for name, xs in sets.items()}
  for name, f in features.items():
    y = np.array([x.label for x in sets[name]])
    print(f"{name} feature AUCs against the label: " + ", ".join(f"{k} {100 * evaluate.auc(v, y):.1f}"
                                                                 for k, v in f.items()))

  def report(when: str) -> None:
    for name, xs in sets.items():
      scores = r.score(xs, r.text, desc=f"{when} {name}", batch_size=16)
      p, y = scores.p_yes, scores.label
      print(f"{when:>12} {name}: AUC {100 * evaluate.auc(p, y):6.2f}  mean P(Yes) | Yes {p[y == 1].mean():.3f}"
            f"  | No {p[y == 0].mean():.3f}  (share of Yes labels {y.mean():.2f}, n {len(y)}); rank corr with "
            + ", ".join(f"{k} {rank_corr(p, v):+.2f}" for k, v in features[name].items()), flush=True)

  report("zero-shot")
  recipe.fit_stage(r, r.text, sets["pool"], args.steps, dict(config.stage1.loss_weights), args.seed,
                   pathlib.Path(tempfile.mkdtemp(prefix="probe_text_only_")))
  report(f"{args.steps} steps")


if __name__ == "__main__":
  main()

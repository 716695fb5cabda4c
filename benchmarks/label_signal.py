"""What in a TALLRec prompt predicts its label without tuning a language model: a yardstick for the quality goals.

  python benchmarks/label_signal.py [--out benchmarks/results] [--domains movie book] [--no-encoder] [--llm_titles]

Each signal is read from the prompt alone or from the histories of all prompts (train pool, valid, test;
never a target's label, nor the user's own rating of the target item where it sits in a later prompt's
history; each user's rating counted once): the history like-ratio; the target item's like share among
other users and its author's among other prompts; whether the user's history holds the target's author;
TF-IDF title similarity of the target to the liked minus the disliked history items. A logistic regression
over all of them is fitted on the same few-shot samples as `fused_quality.py` (16/64/256, seeds 0-2) and on
the whole pool. With the encoder (default), the fused recipe's pretrained sequence encoder (configs/fused_<domain>.py,
seed 0; trained on those histories, stopped on valid) adds its P(like target), the hint that `hint_kd` distils, and
its rank correlation with the like-ratio says how much it knows beyond it. `--llm_titles` adds the LLM's own
view of the titles (SmolLM2's final hidden states averaged over each item's text: the best cosine to a liked
item minus the best to a disliked one; ~20 min for book's 25k items on 2 CPU cores). All AUCs are on the whole
test set. Writes label_signal.{json,md} into --out.
"""

import tempfile
import argparse
import collections
import importlib
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.stats
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from clclm_jax.contrastive import feedback, fusion, recipe  # pylint: disable=wrong-import-position
from clclm_jax.data import fewshot, prompts, tallrec  # pylint: disable=wrong-import-position
from clclm_jax.data.records import Interaction  # pylint: disable=wrong-import-position
from clclm_jax.train import evaluate  # pylint: disable=wrong-import-position

SIGNALS = {"like_ratio": "history like-ratio (smoothed)",
           "item_prior": "target item's like share among other users (in prompt histories)",
           "author_prior": "target author's like share in other prompts' histories (book)",
           "author_liked": "target's author among the user's liked items (book)",
           "author_disliked": "target's author among the user's disliked items (book, sign flipped)",
           "title_similarity": "TF-IDF title similarity: to liked minus to disliked items",
           "llm_title_similarity": "LLM title similarity (SmolLM2 hidden states): to liked minus to disliked items",
           "encoder": "pretrained sequence encoder's P(like), the fused recipe's hint (seed 0)"}
OPTIONAL = ("llm_title_similarity", "encoder")  # signals that need the LLM or the encoder: flags turn them on
SHORT = {"llm_title_similarity": "LLM title similarity", "encoder": "the encoder's P(like)"}
SHOTS, SEEDS = (16, 64, 256), (0, 1, 2)


def _logit(likes: float, total: float) -> float:
  return float(np.log((likes + 1) / (total - likes + 1)))


class Signals:
  """Per-prompt signal values. Counts come from the histories of every prompt in `splits`, one per user and
  item; the prompt's own user's rating of the target (in their other prompts' histories) is left out."""

  def __init__(self, splits: tallrec.TallrecSplits):
    self.catalogue = splits.catalogue
    prompts = list(splits.train) + list(splits.valid) + list(splits.test)
    named = any(x.user for x in prompts)  # movie prompts name users; book files do not (each prompt its own)
    self.ratings = {(x.user if named else -1 - k, i): like
                    for k, x in enumerate(prompts) for i, like in zip(x.history_ids, x.history_likes)}
    self.item = collections.defaultdict(lambda: np.zeros(2))
    self.author = collections.defaultdict(lambda: np.zeros(2))
    for (_, i), like in self.ratings.items():
      self.item[i] += (like, 1)
      self.author[self._author(i)] += (like, 1)
    ids = sorted(it.id for it in self.catalogue)
    self.row = {i: k for k, i in enumerate(ids)}
    titles = [f"{self.catalogue[i].title} {self.catalogue[i].author or ''}" for i in ids]
    self.tfidf = TfidfVectorizer(min_df=2, sublinear_tf=True).fit_transform(titles)

  def _author(self, item_id: int) -> str | None:
    return self.catalogue[item_id].author

  def _item_prior(self, x: Interaction) -> np.ndarray:
    """(likes, ratings) of the target by other users."""
    own = self.ratings.get((x.user, x.target_id)) if x.user else None
    return self.item.get(x.target_id, np.zeros(2)) - (np.zeros(2) if own is None else (own, 1))

  def _similarity(self, target: int, items: list[int]) -> float:
    if not items:
      return 0.0
    rows = self.tfidf[[self.row[i] for i in items]]
    return float((rows @ self.tfidf[self.row[target]].T).toarray().max())

  def __call__(self, x: Interaction) -> dict[str, float]:
    liked = [i for i, like in zip(x.history_ids, x.history_likes) if like]
    disliked = [i for i, like in zip(x.history_ids, x.history_likes) if not like]
    author = self._author(x.target_id)
    same_liked = sum(self._author(i) == author for i in liked) if author is not None else 0
    same_disliked = sum(self._author(i) == author for i in disliked) if author is not None else 0
    other = (self.author.get(author, np.zeros(2)) - (same_liked, same_liked + same_disliked)
             if author is not None else np.zeros(2))
    return {"like_ratio": _logit(len(liked), len(liked) + len(disliked)),
            "item_prior": _logit(*self._item_prior(x)), "author_prior": _logit(*other),
            "author_liked": same_liked, "author_disliked": -same_disliked,
            "title_similarity": self._similarity(x.target_id, liked) - self._similarity(x.target_id, disliked)}


def encoder_signal(r: recipe.Recipe) -> Callable[[Interaction], float]:
  """The fused recipe's encoder, pretrained as `train.py --config=configs/fused_<domain>.py` does (seed 0): its
  logit of P(like target) per prompt of the training pool and the test set."""
  recipe.pretrain_encoder(r, pathlib.Path(tempfile.mkdtemp(prefix="label_signal_encoder_")))
  xs = list(r.splits.train) + list(r.splits.test)
  p = np.clip(feedback.like_probabilities(r.model, xs), 1e-6, 1 - 1e-6)
  logit = dict(zip(map(id, xs), np.log(p / (1 - p)).tolist()))
  return lambda x: logit[id(x)]


def llm_title_signal(r: recipe.Recipe, domain: str) -> Callable[[Interaction], float]:
  """Best cosine of the target's title embedding to a liked history item minus the best to a disliked one."""
  xs = list(r.splits.train) + list(r.splits.test)
  items = sorted({i for x in xs for i in (*x.history_ids, x.target_id)})
  emb = dict(zip(items, fusion.text_embeddings(r.model.llm, r.tokenizer,
                                               [prompts.render_item(r.splits.catalogue[i], domain) for i in items])))

  def score(x: Interaction) -> float:
    cos = [(float(emb[i] @ emb[x.target_id]), like) for i, like in zip(x.history_ids, x.history_likes)]
    best = lambda liked: max((c for c, like in cos if like == liked), default=0.0)
    return best(True) - best(False)
  return score


def domain_result(domain: str, encoder: bool = True, llm_titles: bool = False) -> dict[str, Any]:
  r = recipe.build(importlib.import_module(f"configs.fused_{domain}").get_config()) if encoder or llm_titles else None
  splits = tallrec.tallrec_splits(domain) if r is None else r.splits
  extra = {**({"llm_title_similarity": llm_title_signal(r, domain)} if llm_titles else {}),
           **({"encoder": encoder_signal(r)} if encoder else {})}
  signals = Signals(splits)
  names = [n for n in SIGNALS if (domain == "book" or "author" not in n) and (n in extra or n not in OPTIONAL)]
  row = lambda x: {**signals(x), **{n: f(x) for n, f in extra.items()}}
  features = lambda xs: np.asarray([[s[n] for n in names] for s in map(row, xs)])
  test_x, test_y = features(splits.test), np.asarray([x.label for x in splits.test])
  single = {n: evaluate.auc(test_x[:, k], test_y) for k, n in enumerate(names)}
  fitted = {}
  for shots in (*SHOTS, None):
    aucs = []
    for seed in (SEEDS if shots else (0,)):
      train = fewshot.fewshot(splits.train, shots, seed)
      y = np.asarray([x.label for x in train])
      model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
      model.fit(features(train), y)
      aucs.append(evaluate.auc(model.decision_function(test_x), test_y))
    fitted["all" if shots is None else str(shots)] = aucs
  out = {"domain": domain, "test_n": len(splits.test), "pool_n": len(splits.train), "signals": single,
         "logistic_regression": fitted}
  out["like_ratio_spearman"] = {n: float(scipy.stats.spearmanr(test_x[:, names.index(n)],
                                                                 test_x[:, names.index("like_ratio")])[0])
                                 for n in extra}
  return out


def markdown(results: list[dict[str, Any]], machine: dict[str, Any],
             command: str = "python benchmarks/label_signal.py") -> str:
  domains = [r["domain"] for r in results]
  rows = [[SIGNALS[n], *(f"{100 * r['signals'][n]:.2f}" if n in r["signals"] else "-" for r in results)]
          for n in SIGNALS if any(n in r["signals"] for r in results)]
  for key in (*map(str, SHOTS), "all"):
    label = "the whole pool" if key == "all" else f"{key} shots, seeds 0-2"
    rows.append([f"logistic regression on all signals, fitted on {label}",
                 *(common.mean_std([100 * a for a in r["logistic_regression"][key]]) for r in results)])
  for n in OPTIONAL:
    if any(n in r.get("like_ratio_spearman", {}) for r in results):
      rows.append([f"rank correlation (Spearman) with the like-ratio, test set: {SHORT[n]}",
                   *(f"{r['like_ratio_spearman'][n]:.3f}" if n in r.get("like_ratio_spearman", {}) else "-"
                     for r in results)])
  pools = ", ".join(f"{r['domain']} {r['pool_n']}" for r in results)
  return "\n".join([
      "# What predicts a TALLRec label without tuning a language model", "",
      f"AUC x100 on the whole test sets. Training pools: {pools} prompts. {common.machine_line(machine)}. "
      f"Produced by `{command}`.", "",
      common.markdown_table(["signal", *domains], rows), ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--domains", nargs="+", default=["movie", "book"], choices=("movie", "book"))
  p.add_argument("--encoder", action=argparse.BooleanOptionalAction, default=True,
                 help="add the fused recipe's pretrained encoder as a signal (loads the LLM; ~1-3 min a domain)")
  p.add_argument("--llm_titles", action="store_true",
                 help="add the LLM's title similarity as a signal (~20 min for book on 2 CPU cores)")
  args = p.parse_args(argv)
  command = " ".join(["python benchmarks/label_signal.py", *(["--no-encoder"] if not args.encoder else []),
                       *(["--llm_titles"] if args.llm_titles else []),
                       *(["--domains", *args.domains] if args.domains != ["movie", "book"] else [])])
  result = {"machine": common.machine(), "command": command,
            "results": [domain_result(d, args.encoder, args.llm_titles) for d in args.domains]}
  common.write_result(args.out, "label_signal", result, markdown(result["results"], result["machine"], command))
  return result


if __name__ == "__main__":
  main()

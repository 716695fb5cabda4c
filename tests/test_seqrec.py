"""Text-to-item retrieval (BM25, merge, dense + cache), full-catalogue metrics and the baselines."""

import math
import warnings

import numpy as np
import pytest

from clclm_jax.data import nextitem
from clclm_jax.data.errors import DataError
from clclm_jax.seqrec import baselines, metrics, retrieval

TEXTS = ["Title: red lipstick matte", "Title: black mascara waterproof", "Title: red blush powder",
         "Title: rose toner", "Title: vitamin serum", "Title: matte primer"]


def test_merge_round_robin_order():
  lists = [[1, 2, 3], [2, 4, 5], [6, 1, 7]]
  assert retrieval.merge_round_robin(lists) == [1, 2, 6, 4, 3, 5, 7]
  assert retrieval.merge_round_robin(lists, 4) == [1, 2, 6, 4]
  assert retrieval.merge_round_robin(lists, 4, exclude=[2, 6]) == [1, 4, 3, 5]
  assert retrieval.merge_round_robin([[3, 0, 0], [1]], 5) == [3, 1]  # padding skipped
  assert retrieval.merge_round_robin([]) == []


def test_drop_history():
  assert retrieval.drop_history([5, 1, 4, 2, 3], [1, 2]) == [5, 4, 3]


def test_bm25_retrieve_and_exclude():
  index = retrieval.BM25Index(TEXTS)
  ids = index.retrieve(["red matte lipstick", "waterproof mascara", "unrelated words"], 3)
  assert ids[0, 0] == 1 and set(ids[0, 1:]) == {3, 6}
  assert ids[1, 0] == 2
  assert ids[2].tolist() == [1, 2, 3]  # no shared word: all tie at 0, ranked by row
  assert index.retrieve(["red matte lipstick"], 2, exclude=[[1]])[0].tolist()[0] in (3, 6)
  assert index.retrieve(["red"], 2, exclude=[[1, 2, 3, 4]])[0].tolist() == [5, 6]
  assert index.retrieve(["red"], 10, exclude=[[1, 2, 3, 4]])[0].tolist() == [5, 6, 0, 0, 0, 0]  # k capped at N
  scores = index.scores(["red"])
  assert scores.shape == (1, 6) and scores[0, 0] > 0 and scores[0, 2] > 0 and scores[0, 1] == 0


def test_bm25_custom_ids_and_merged():
  index = retrieval.BM25Index(TEXTS[:3], item_ids=[10, 20, 30])
  assert index.retrieve(["mascara"], 1).tolist() == [[20]]
  merged = index.retrieve_merged([["lipstick", "mascara"], ["blush"]], 2, exclude=[[10], []])
  assert merged[0] == [20, 30] and merged[1][0] == 30


def test_bm25_bad_catalogue():
  with pytest.raises(DataError, match="the catalogue has no item text"):
    retrieval.BM25Index([])
  with pytest.raises(DataError, match=r"record 1: the item text is empty"):
    retrieval.BM25Index(["Title: a", "  "])


def test_metrics_hand_computed():
  ranks = np.array([0, 3, 7, metrics.MISS])
  m = metrics.ranking_metrics(ranks)
  assert m["count"] == 4
  assert m["Recall@1"] == pytest.approx(0.25) and m["Recall@5"] == pytest.approx(0.5)
  assert m["Recall@10"] == pytest.approx(0.75)
  assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
  assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(9)) / 4)
  assert metrics.ranks_from_lists([[4, 2, 9], [1, 2], [3]], [2, 5, 3]).tolist() == [1, metrics.MISS, 0]


def test_ranks_from_scores_ties_and_exclusion():
  scores = np.array([[0.1, 0.5, 0.5, 0.9], [1.0, 1.0, 1.0, 1.0]], np.float32)
  assert metrics.ranks_from_scores(scores, [3, 3]).tolist() == [2, 2]  # ties: earlier rows rank first
  assert metrics.ranks_from_scores(scores, [3, 3], exclude=[[4], [1, 2, 3]]).tolist() == [1, 0]  # target kept
  assert metrics.ranks_from_scores(np.array([3.0, 1.0, 2.0]), [1, 2, 3]).tolist() == [0, 2, 1]  # shared [N]
  # A score matrix and the lists top_k makes from it agree, ties included.
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 4, (50, 20)).astype(np.float32)
  targets = rng.integers(1, 21, 50)
  ids = np.arange(1, 21)
  lists = retrieval.top_k(scores, 20, ids)
  assert metrics.ranks_from_lists(lists, targets).tolist() == metrics.ranks_from_scores(scores, targets).tolist()
  history = [rng.choice(np.arange(1, 21), 3, replace=False).tolist() for _ in range(50)]
  history = [[h for h in hs if h != t] for hs, t in zip(history, targets)]
  lists = retrieval.top_k(scores, 20, ids, exclude=history)
  assert (metrics.ranks_from_lists(lists, targets).tolist()
          == metrics.ranks_from_scores(scores, targets, exclude=history, chunk=7).tolist())


def test_dense_top_k():
  items = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
  users = np.array([[3.0, 0.1], [0.0, 1.0]])
  assert retrieval.dense_top_k(users, items, 2).tolist() == [[1, 3], [2, 3]]
  assert retrieval.dense_top_k(users, items, 2, chunk=1, exclude=[[1], []]).tolist() == [[3, 2], [2, 3]]
  assert retrieval.dense_top_k(users, items, 1, item_ids=np.array([7, 8, 9, 10])).tolist() == [[7], [8]]
  np.testing.assert_allclose(retrieval.cosine_scores(users[1:], items)[0], [0, 1, 2**-0.5, 0], atol=1e-6)


def test_item_vector_cache(tmp_path):
  calls = []

  def compute(value):
    def fn():
      calls.append(value)
      return np.full((3, 2), value, np.float32)
    return fn

  key = {"model": "tiny", "step": 10, "texts": retrieval.text_fingerprint(TEXTS)}
  a = retrieval.cached_vectors(tmp_path, key, compute(1.0))
  b = retrieval.cached_vectors(tmp_path, dict(key), compute(2.0))
  assert calls == [1.0] and np.array_equal(a, b)  # reused
  files = sorted(p.name for p in tmp_path.iterdir())
  assert len(files) == 1 and files[0].startswith("item_vectors-") and files[0].endswith(".npy")
  stale_key = dict(key, texts=retrieval.text_fingerprint(TEXTS[:-1] + ["Title: new primer"]))
  c = retrieval.cached_vectors(tmp_path, stale_key, compute(3.0))
  assert calls == [1.0, 3.0] and c[0, 0] == 3.0  # a changed catalogue misses the cache
  assert len(list(tmp_path.iterdir())) == 1  # the stale file is gone, no temporary left
  (tmp_path / "item_vectors-v2-notes.npy").write_bytes(b"other")
  retrieval.cached_vectors(tmp_path, dict(key, step=20), compute(4.0))
  assert (tmp_path / "item_vectors-v2-notes.npy").exists()  # only this cache's own files are removed


def toy():
  titles = ["red lipstick", "black mascara", "red blush", "rose toner", "vitamin serum"]
  return nextitem.from_histories("toy", "product", [[1, 2, 3, 4], [2, 1, 5, 3], [4, 2, 1, 5]], titles)


def test_popularity_and_bm25_baselines():
  data = toy()
  # training histories: [1, 2], [2, 1], [4, 2]
  np.testing.assert_array_equal(baselines.popularity_scores(data), [2, 3, 0, 1, 0])
  test = nextitem.examples(data, "test")
  pop = baselines.rankings(baselines.popularity_scorer(data), data, test)
  assert pop[0].tolist() == [2, 1, 4, 3, 5]
  m = baselines.evaluate(baselines.popularity_scorer(data), data, test)
  assert m["Recall@1"] == 0 and m["Recall@5"] == 1 and m["count"] == 3
  # targets 4, 3, 5 rank 2, 3, 4 in [2, 1, 4, 3, 5]
  assert m["NDCG@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(5) + 1 / math.log2(6)) / 3)
  pop_ex = baselines.rankings(baselines.popularity_scorer(data), data, test, exclude_history=True)
  assert pop_ex[0].tolist() == [4, 5, 0, 0, 0]  # history 1, 2, 3 dropped, padded with 0
  bm25 = baselines.bm25_last_item_scorer(data)
  ranked = baselines.rankings(bm25, data, test, exclude_history=True)
  assert ranked[1, 0] == 3  # last item 5 "vitamin serum" shares no word; ties by row, history 2, 1, 5 dropped
  assert baselines.rankings(bm25, data, test)[0, 0] == 3  # its own last item first
  # user 0: "red blush" -> 4, 5 tie -> 4 (hit); user 1 -> 3 (hit); user 2: "red lipstick" -> 3 (target 5: miss)
  assert baselines.evaluate(bm25, data, test, exclude_history=True)["Recall@1"] == pytest.approx(2 / 3)


def test_sample_examples():
  data = nextitem.from_histories("x", "product", [[1, 2, 3]] * 50, ["a", "b", "c"])
  test = nextitem.examples(data, "test")
  a = baselines.sample_examples(test, 10, seed=3)
  assert a == baselines.sample_examples(test, 10, seed=3) and len(a) == 10
  assert [ex.user for ex in a] == sorted(ex.user for ex in a)
  assert a != baselines.sample_examples(test, 10, seed=4)
  assert baselines.sample_examples(test, 100) == test


def test_baselines_on_ml100k(data_root):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    data = nextitem.load("ml100k", data_root)
  test = baselines.sample_examples(nextitem.examples(data, "test"), 200, seed=0)
  pop = baselines.evaluate(baselines.popularity_scorer(data), data, test)
  bm25 = baselines.evaluate(baselines.bm25_last_item_scorer(data), data, test, exclude_history=True)
  for m in (pop, bm25):
    assert m["count"] == 200 and 0 <= m["Recall@1"] <= m["Recall@5"] <= m["Recall@10"] <= 1
    assert m["NDCG@5"] <= m["NDCG@10"]

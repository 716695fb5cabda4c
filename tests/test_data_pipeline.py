"""grain pipelines: batch layout, bucketing, determinism, save/restore, sharding, eval coverage, packing."""

import itertools

import numpy as np
import pytest

from clclm_jax.data import fewshot, pipeline
from clclm_jax.data.errors import DataError
from clclm_jax.data.records import Catalogue, Interaction, Item


class ByteTokenizer:
  bos_token_id, eos_token_id = 1, 2

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return [self.bos_token_id] * add_special_tokens + [b + 3 for b in text.encode("utf-8")]


CATALOGUE = Catalogue(Item(i, f"M{i}" * (1 + i % 5)) for i in range(1, 41))


def _interactions(n: int) -> list[Interaction]:
  rng = np.random.default_rng(0)
  out = []
  for u in range(n):
    k = int(rng.integers(0, 11))
    ids, likes = rng.integers(1, 41, k), rng.integers(0, 2, k)
    out.append(Interaction(u + 1, tuple(map(int, ids)), tuple(map(bool, likes)), int(rng.integers(1, 41)),
                           int(rng.integers(0, 2))))
  return out


@pytest.fixture(scope="module")
def examples():
  return pipeline.tallrec_examples(_interactions(50), CATALOGUE, "movie", ByteTokenizer(), cutoff_len=600,
                                   history_len=6)


def test_fewshot_deterministic_and_nested():
  pool = list(range(100))
  assert fewshot.fewshot(pool, 16, seed=3) == fewshot.fewshot(pool, 16, seed=3)
  assert fewshot.fewshot(pool, 16, seed=3) != fewshot.fewshot(pool, 16, seed=4)
  assert fewshot.fewshot(pool, 64, seed=3)[:16] == fewshot.fewshot(pool, 16, seed=3)
  assert sorted(fewshot.fewshot(pool, None, seed=3)) == pool
  with pytest.raises(ValueError, match="n=101 must be in"):
    fewshot.fewshot(pool, 101, seed=0)


def test_history_targets_relabel_history_items_only():
  xs = _interactions(30)
  extra = fewshot.history_targets(xs, 3, seed=0)
  assert extra == fewshot.history_targets(xs, 3, seed=0)
  assert len(extra) == sum(min(3, len(x.history_ids)) for x in xs if len(x.history_ids) >= 2)
  for y in extra:
    x = next(x for x in xs if x.user == y.user)
    j = next(j for j in range(len(x.history_ids))  # the held-out position: the rest matches in order
             if x.history_ids[:j] + x.history_ids[j + 1:] == y.history_ids
             and x.history_likes[:j] + x.history_likes[j + 1:] == y.history_likes)
    assert (y.target_id, y.label) == (x.history_ids[j], int(x.history_likes[j]))
    assert y.target_id != x.target_id or x.target_id in x.history_ids  # never the prompt's own target


def test_batch_layout(examples):
  b = next(iter(pipeline.train_dataset(examples, batch_size=8, seed=0, shard_index=0, shard_count=1)))
  t = b["tokens"].shape[1]
  assert t % 64 == 0 and t - 64 < b["attention_mask"].sum(1).max() <= t  # Bucketed, not padded to cutoff.
  assert {k: v.shape for k, v in b.items()} == {
      "tokens": (8, t), "positions": (8, t), "attention_mask": (8, t), "loss_mask": (8, t), "answer_index": (8,),
      "label": (8,), "user_ids": (8,), "index": (8,), "history_ids": (8, 6)}
  assert all(v.dtype == np.int32 for v in b.values())
  xs = _interactions(50)
  for r in range(8):
    x, n = xs[b["index"][r]], b["attention_mask"][r].sum()
    assert b["user_ids"][r] == x.user and b["label"][r] == x.label
    hist = list(x.history_ids[-6:])
    np.testing.assert_array_equal(b["history_ids"][r], [0] * (6 - len(hist)) + hist)
    answer = b["tokens"][r, b["answer_index"][r] + 1] - 3
    assert chr(answer) == ("Y" if x.label else "N") and b["tokens"][r, n - 1] == 2
    np.testing.assert_array_equal(b["positions"][r, :n], np.arange(n))
    assert b["loss_mask"][r, 0] == 0 and b["loss_mask"][r, n:].sum() == 0


def test_deterministic_and_restores_exactly(examples):
  def make():
    return iter(pipeline.train_dataset(examples, batch_size=4, seed=7, shard_index=0, shard_count=1))

  it = make()
  for _ in range(15):  # Past the first epoch (12 batches).
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh = make()
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  again = make()
  np.testing.assert_array_equal(next(again)["index"], next(make())["index"])


def test_epochs_reshuffle_and_cover(examples):
  it = iter(pipeline.train_dataset(examples, batch_size=5, seed=1, shard_index=0, shard_count=1))
  first = np.concatenate([next(it)["index"] for _ in range(10)])
  second = np.concatenate([next(it)["index"] for _ in range(10)])
  assert sorted(first) == sorted(second) == list(range(50)) and list(first) != list(second)


def test_two_shards_disjoint_and_covering(examples):
  seen = []
  for shard in range(2):
    ds = pipeline.train_dataset(examples, batch_size=5, seed=0, num_epochs=1, shard_index=shard, shard_count=2)
    seen.append({int(i) for b in ds for i in b["index"]})
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(50))


def test_eval_keeps_every_record_once_sorted(examples):
  per_shard = []
  for shard in range(3):  # 17, 17 and 16 records: all three shards yield 3 batches.
    batches = list(pipeline.eval_dataset(examples, batch_size=8, shard_index=shard, shard_count=3))
    assert len(batches) == 3
    lengths = np.concatenate([b["attention_mask"].sum(1)[b["index"] >= 0] for b in batches])
    assert (np.diff(lengths) >= 0).all()
    assert all(b["tokens"].shape[0] == 8 for b in batches)
    per_shard.append([int(i) for b in batches for i in b["index"] if i >= 0])
  assert sorted(sum(per_shard, [])) == list(range(50))


def test_eval_widths_are_few_and_pad_least(examples):
  """`batch_widths` against every split of the batches into groups (brute force), then in `eval_dataset`."""
  rng = np.random.default_rng(0)
  for _ in range(100):
    longest, k = np.sort(rng.integers(1, 200, rng.integers(1, 8))).tolist(), int(rng.integers(1, 5))
    widths = pipeline.batch_widths(longest, k)
    m = [8 * -(-n // 8) for n in longest]
    best = min(sum((b - a) * max(m[a:b]) for a, b in zip((0, *cuts), (*cuts, len(m))))
               for c in range(min(k, len(m))) for cuts in itertools.combinations(range(1, len(m)), c))
    assert sum(widths) == best and len(set(widths)) <= k and all(w >= n and w % 8 == 0 for w, n in zip(widths, m))
  assert pipeline.batch_widths([10, 20, 30, 40], 2) == [24, 24, 40, 40]
  batches = list(pipeline.eval_dataset(examples, batch_size=8, max_widths=2, shard_index=0, shard_count=1))
  coarse = list(pipeline.eval_dataset(examples, batch_size=8, shard_index=0, shard_count=1))
  assert len({b["tokens"].shape[1] for b in batches}) <= 2
  assert sum(b["tokens"].size for b in batches) <= sum(b["tokens"].size for b in coarse)
  for b, c in zip(batches, coarse):  # the same rows, only the padding differs
    n = b["attention_mask"].sum(1)
    np.testing.assert_array_equal(n, c["attention_mask"].sum(1))
    np.testing.assert_array_equal(b["tokens"][:, :n.max()], c["tokens"][:, :n.max()])
  with pytest.raises(ValueError, match="shorter than the batch's longest"):
    pipeline.collate([{"tokens": np.ones(9, np.int32), "loss_mask": np.ones(9, np.int32), "answer_index": 8,
                       "label": 1, "user_ids": 0, "index": 0, "history_ids": np.zeros(2, np.int32)}], width=8)


def test_packing_segments_and_positions(examples):
  b = next(iter(pipeline.train_dataset(examples, batch_size=2, seed=0, pack_len=2048, shard_index=0, shard_count=1)))
  assert set(b) == {"tokens", "loss_mask", "segment_ids", "positions"}
  seg, pos = b["segment_ids"][0], b["positions"][0]
  assert seg.max() >= 2 and (seg[:seg.argmin()] > 0).all()
  starts = np.flatnonzero(np.diff(seg) != 0) + 1
  assert all(pos[s] == 0 for s in starts if seg[s] > 0) and (b["tokens"][0][seg == 0] == 0).all()
  assert ((b["tokens"][0][pos == 0] == 1) | (seg[pos == 0] == 0)).all()  # Every segment starts with BOS.


def test_alpaca_examples_drop_long_records():
  records = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
             {"instruction": "x" * 500, "input": "", "output": "long"},
             {"instruction": "Add.", "input": "1 + 1", "output": "2"}]
  ds = pipeline.alpaca_examples(records, ByteTokenizer(), cutoff_len=256)
  assert [int(e["index"]) for e in ds] == [0, 2]
  (b,) = list(pipeline.eval_dataset(ds, batch_size=4, shard_index=0, shard_count=1))
  assert list(b["index"]) == [0, 2, -1, -1] and list(b["label"]) == [-1] * 4
  longest = max(len(e["tokens"]) for e in ds)
  assert b["tokens"].shape == (4, -(-longest // 64) * 64) and b["attention_mask"][2:].sum() == 0


def test_packed_iterator_restores_exactly(examples):
  def make():
    return iter(pipeline.train_dataset(examples, batch_size=2, seed=3, pack_len=2048, shard_index=0, shard_count=1))

  it = make()
  for _ in range(4):
    next(it)
  state, want = it.get_state(), next(it)
  fresh = make()
  fresh.set_state(state)
  got = next(fresh)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_encoding_error_names_source_file():
  long_target = Catalogue([Item(1, "x" * 400)])
  ds = pipeline.tallrec_examples([Interaction(1, (), (), 1, 0)], long_target, "movie", ByteTokenizer(),
                                 cutoff_len=256, path="movie/test.json")
  with pytest.raises(DataError, match=r"movie/test.json record 0: even with no history the prompt is too long"):
    ds[0]

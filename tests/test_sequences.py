"""Sequence loading, leave-one-out split and padding."""

import numpy as np
import pytest

from clclm_jax.data import sequences
from clclm_jax.data.errors import DataError


def _data(*seqs):
  return sequences.SequenceData("toy", tuple(np.asarray(s, np.int32) for s in seqs), 9)


def test_beauty_parses_crlf_and_reindexes(tmp_path):
  p = tmp_path / "sequential_data.txt"
  p.write_bytes(b"1 10 20 30 40\r\n2 20 50 10 60 70\r\n3 10 80\r\n")
  data = sequences.load_beauty(p)
  assert data.num_items == 7 and data.mask_id == 8 and data.vocab_size == 9
  assert [s.tolist() for s in data.sequences] == [[1, 2, 3, 4], [2, 5, 1, 6, 7]]  # user 3 too short, item 80 gone


def test_beauty_malformed_line_names_file_and_line(tmp_path):
  p = tmp_path / "sequential_data.txt"
  p.write_bytes(b"1 10 20 30 40\r\n2 20 x 10\r\n")
  with pytest.raises(DataError, match=r"sequential_data.txt record 2: expected"):
    sequences.load_beauty(p)


def test_ml100k_orders_by_timestamp(tmp_path):
  p = tmp_path / "u.data"
  p.write_text("1\t10\t5\t300\n1\t30\t3\t100\n1\t20\t4\t200\n1\t40\t1\t400\n2\t10\t5\t1\n")
  data = sequences.load_ml100k(p)
  assert [s.tolist() for s in data.sequences] == [[3, 2, 1, 4]]  # ids: 10->1, 20->2, 30->3, 40->4
  p.write_text("1\t30\t5\n")
  with pytest.raises(DataError, match="u.data record 1"):
    sequences.load_ml100k(p)


def test_leave_one_out_keeps_targets_out_of_training():
  data = _data([1, 2, 3, 4, 5, 6], [7, 8, 9, 1])
  train_in, train_tgt = sequences.split(data, "train")
  valid_in, valid_tgt = sequences.split(data, "valid")
  test_in, test_tgt = sequences.split(data, "test")
  assert train_in[0].tolist() == [1, 2, 3] and train_tgt[0].tolist() == [2, 3, 4]
  assert valid_in[0].tolist() == [1, 2, 3, 4] and valid_tgt.tolist() == [5, 9]
  assert test_in[0].tolist() == [1, 2, 3, 4, 5] and test_tgt.tolist() == [6, 1]
  for s, seen in zip(data.sequences, sequences.train_sequences(data)):
    assert seen.tolist() == s[:-2].tolist()


def test_pad_left_and_right_keep_the_last_items():
  seqs = [np.arange(1, 8), np.asarray([9])]
  right, n = sequences.pad(seqs, 4)
  left, _ = sequences.pad(seqs, 4, side="left")
  assert n.tolist() == [4, 1]
  assert right.tolist() == [[4, 5, 6, 7], [9, 0, 0, 0]]
  assert left.tolist() == [[4, 5, 6, 7], [0, 0, 0, 9]]


def test_train_batches_cover_users_with_aligned_targets():
  data = _data(*[np.arange(1, 5 + u % 7) % 9 + 1 for u in range(40)])
  batches = list(sequences.train_batches(data, 8, np.random.default_rng(0), buckets=(4, 8)))
  assert len(batches) == 5
  for b in batches:
    items, targets, lengths = b["items"], b["targets"], b["lengths"]
    assert items.shape == targets.shape and items.shape[1] in (4, 8)
    real = np.arange(items.shape[1])[None] < lengths[:, None]
    assert (items[~real] == 0).all() and (targets[~real] == 0).all() and (items[real] > 0).all()
    assert (items[:, 1:][real[:, 1:]] == targets[:, :-1][real[:, 1:]]).all()  # shifted by one


def test_same_target_views_are_other_prefixes_before_the_same_item():
  data = _data([1, 2, 3, 4, 8, 9], [5, 2, 3, 8, 9], [6, 7, 3, 4, 8, 9], [7, 4, 5, 9], [1, 6, 8, 9])
  index = sequences.same_target_index(data)
  train = sequences.train_sequences(data)  # [1 2 3 4] [5 2 3] [6 7 3 4] [7 4] [1 6]
  rng = np.random.default_rng(0)
  seen = {u: set() for u in range(5)}
  for _ in range(50):
    for u, view in zip(range(5), sequences.same_target_views(index, data, np.arange(5), rng)):
      seen[u].add(tuple(view.tolist()))
  # user 0's input [1 2 3] precedes 4: user 2's [6 7 3] and user 3's [7] do too.
  assert seen[0] == {(6, 7, 3), (7,)}
  assert seen[1] == {(1, 2), (6, 7)}  # [5 2] precedes 3, as do user 0's [1 2] and user 2's [6 7]
  assert seen[3] == {(1, 2, 3), (6, 7, 3)}
  assert seen[4] == {(1,)}  # no other prefix precedes 6: the user's own input
  batch = next(sequences.train_batches(data, 4, rng, buckets=(2, 4), same_target=index))
  assert batch["same_target"].shape == batch["items"].shape
  # With buckets (1, 2, 3) a view of 3 items (user 3's) widens a batch of shorter inputs instead of being cut.
  prefixes = {tuple(s[:k].tolist()) for s in train for k in range(1, len(s))}
  for _ in range(20):
    batch = next(sequences.train_batches(data, 2, rng, buckets=(1, 2, 3), group=1, same_target=index))
    views = [tuple(row[row > 0].tolist()) for row in batch["same_target"]]
    assert set(views) <= prefixes


def test_beauty_real_statistics(data_root):
  data = sequences.load_beauty(data_root / "amazon-beauty-5core" / "sequential_data.txt")
  assert (len(data.sequences), data.num_items) == (22363, 12101)
  assert sum(len(s) for s in data.sequences) == 198502
  assert min(int(s.min()) for s in data.sequences) == 1
  assert max(int(s.max()) for s in data.sequences) == 12101

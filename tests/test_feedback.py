"""Target-aware encoder inputs and the feedback pretraining of the fused model's encoder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_helpers
from clclm_jax.contrastive import feedback
from clclm_jax.data.fused import left_pad as joint_left_pad
from clclm_jax.contrastive.fusion import FusedRec, FusionConfig, encoder_inputs
from clclm_jax.data.records import Catalogue, Interaction, Item
from clclm_jax.data.tallrec import TallrecSplits

NUM_ITEMS = 20


def _model(seed: int = 0) -> FusedRec:
  cfg = FusionConfig(num_items=NUM_ITEMS, placeholder_id=5, num_soft_tokens=2, encoder_hidden=16, projector_hidden=16,
                     encoder_dropout=0.0, max_len=7, target_aware=True)
  return FusedRec(train_helpers.tiny_model(), cfg, rngs=nnx.Rngs(seed))


def test_encoder_inputs_shift_feedback_and_append_the_target():
  ids, fb = jnp.array([[0, 3, 4], [6, 7, 8]]), jnp.array([[0, 1, 2], [2, 2, 1]])
  with_target = encoder_inputs(ids, fb, jnp.array([9, 10]))
  np.testing.assert_array_equal(with_target[0], [[0, 3, 4, 9], [6, 7, 8, 10]])
  np.testing.assert_array_equal(with_target[1], [[0, 0, 1, 2], [0, 2, 2, 1]])
  without = encoder_inputs(ids, fb)
  np.testing.assert_array_equal(without[0], ids)
  np.testing.assert_array_equal(without[1], [[0, 0, 1], [0, 2, 2]])


def test_like_at_item_t_sees_only_earlier_likes():
  model = _model()
  ids = jnp.array([[0, 3, 4, 5, 6]])

  def logits(fb):
    x_ids, x_fb = encoder_inputs(ids, fb)
    return model.like_logit(model.encoder(x_ids, feedback_bl=x_fb))

  base, flipped = logits(jnp.array([[0, 1, 1, 1, 1]])), logits(jnp.array([[0, 1, 1, 2, 1]]))  # like of item 5 flips
  np.testing.assert_allclose(base[0, :4], flipped[0, :4], atol=1e-6)  # up to and including item 5 itself
  assert abs(float(base[0, 4] - flipped[0, 4])) > 1e-4  # item 6 sees it


def _synthetic(n_users: int, rng) -> list[tuple[np.ndarray, np.ndarray]]:
  """Odd items are liked, even ones disliked, whoever the user."""
  seqs = []
  for _ in range(n_users):
    items = rng.choice(np.arange(1, NUM_ITEMS + 1), 12, replace=False).astype(np.int32)
    seqs.append((items, np.where(items % 2 == 1, feedback.LIKED, feedback.DISLIKED).astype(np.int32)))
  return seqs


def test_pretraining_learns_feedback_and_touches_only_the_encoder(tmp_path):
  """The next-feedback BCE alone (cl_weight=0: the augmentation's compile is most of this test's time): that the
  InfoNCE term reaches only the encoder is test_fusion's test_gradients_flow_only_where_intended[seq_cl], and
  pretraining with it runs end to end in test_cli's tiny_fused run."""
  rng = np.random.default_rng(0)
  model = _model()
  prompts = [Interaction(0, tuple(int(i) for i in s[:6]), tuple(bool(f == feedback.LIKED) for f in c[:6]),
                         int(s[6]), int(c[6] == feedback.LIKED)) for s, c in _synthetic(64, rng)]
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  auc0 = feedback.encoder_auc(model, prompts)
  cfg = feedback.PretrainConfig(epochs=30, batch_size=32, lr=3e-3, window=7, stride=3, cl_weight=0.0, patience=30)
  result = feedback.pretrain(model, _synthetic(200, rng), prompts, cfg, tmp_path)
  assert result["best_valid_auc"] > 0.95 > auc0
  assert feedback.encoder_auc(model, prompts) == result["best_valid_auc"]  # the best epoch is kept
  after = jax.tree.leaves(nnx.state(model, nnx.Param))
  for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), after, strict=True):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    assert (not np.array_equal(old, np.asarray(new))) == name.startswith(("encoder", "feedback_head")), name


def test_pretraining_on_fewer_windows_than_a_batch_still_steps(tmp_path):
  rng = np.random.default_rng(0)
  model = _model()
  prompts = [Interaction(0, (1, 2), (True, False), 3, 1), Interaction(0, (4, 5), (False, True), 6, 0)]
  cfg = feedback.PretrainConfig(epochs=1, batch_size=256, window=7, stride=3, patience=1, cl_weight=0.0)
  result = feedback.pretrain(model, _synthetic(5, rng), prompts, cfg, tmp_path)
  assert result["steps"] == 1  # one batch of every window
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert len(rows) == 1 and np.isfinite(rows[0]["train/loss/feedback"])
  with pytest.raises(ValueError, match=r"no behaviour sequences .* set config.fusion.pretrain.epochs=0"):
    feedback.pretrain(model, [], prompts, cfg, tmp_path)


def _ml100k(root, rows):
  (root / "ml-100k").mkdir(parents=True)
  (root / "ml-100k" / "u.item").write_bytes(
      "".join(f"{i}|Movie {i} (1995)|01-Jan-1995||url|" + "|".join("0" * 19) + "\n" for i in range(1, 9)).encode())
  (root / "ml-100k" / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))


def test_movie_sequences_stop_before_each_users_first_held_target(tmp_path):
  rows = [(1, 1, 5, 10), (1, 2, 1, 11), (1, 3, 4, 12), (1, 4, 2, 13), (2, 5, 4, 10), (2, 6, 5, 20), (3, 7, 3, 5)]
  _ml100k(tmp_path, rows)
  cat = Catalogue(Item(i, f"Movie {i} (1995)") for i in range(1, 9))
  test = [Interaction(1, (1, 2), (True, False), 3, 1, 12), Interaction(1, (2, 3), (False, True), 4, 0, 13)]
  valid = [Interaction(2, (5,), (True,), 6, 1, 20)]
  splits = TallrecSplits([Interaction(3, (), (), 7, 0, 5)], valid, test, cat)
  seqs = {tuple(s.tolist()): c.tolist() for s, c in feedback.behaviour_sequences("movie", splits, tmp_path)}
  assert seqs == {(1, 2): [1, 2], (5,): [1], (7,): [2]}  # user 3's train target stays: behaviour, not held


def test_book_sequences_are_prompt_histories_without_targets():
  cat = Catalogue(Item(i, f"Book {i}", "A") for i in range(1, 9))
  xs = [Interaction(0, (1, 2), (True, False), 7, 1), Interaction(0, (3,), (False,), 8, 0),
        Interaction(0, (), (), 6, 1)]
  splits = TallrecSplits(xs[:1], xs[1:2], xs[2:], cat)
  seqs = feedback.behaviour_sequences("book", splits)
  assert [(s.tolist(), c.tolist()) for s, c in seqs] == [([1, 2], [1, 2]), ([3], [2])]
  ids, fb = feedback.windows(seqs, window=3, stride=2)
  np.testing.assert_array_equal(ids, [[0, 1, 2], [0, 0, 3]])
  np.testing.assert_array_equal(fb, [[0, 1, 2], [0, 0, 2]])


@pytest.mark.parametrize("hint_scale", [1.0, 3.0])
def test_answer_hint_is_the_first_soft_token(hint_scale):
  cfg = FusionConfig(num_items=NUM_ITEMS, placeholder_id=5, num_soft_tokens=3, encoder_hidden=16, projector_hidden=16,
                     encoder_dropout=0.0, max_len=7, target_aware=True, answer_hint=(11, 12), hint_scale=hint_scale)
  model = FusedRec(train_helpers.tiny_model(), cfg, rngs=nnx.Rngs(0))
  ids, fb, target = jnp.array([[0, 3, 4], [6, 7, 8]]), jnp.array([[0, 1, 2], [2, 2, 1]]), jnp.array([9, 10])
  soft_bkd = model.soft_tokens(ids, fb, target)
  z_be, _ = model.encode_history(ids, fb, target)
  p_b = jax.nn.sigmoid(hint_scale * model.like_logit(z_be))
  table_vd = model.llm.embed(jnp.array([11, 12]))
  np.testing.assert_allclose(soft_bkd[:, 0], p_b[:, None] * table_vd[0] + (1 - p_b[:, None]) * table_vd[1], rtol=1e-5)
  np.testing.assert_allclose(soft_bkd[:, 1:], model.projector(z_be)[:, 1:], rtol=1e-6)
  with pytest.raises(ValueError, match="answer_hint"):
    FusionConfig(num_items=NUM_ITEMS, placeholder_id=5, answer_hint=(11, 12))


@pytest.mark.parametrize("shuffle_order", [False, True])
def test_window_batches_permute_and_hide_items_keeping_likes_with_them(shuffle_order):
  ids = np.stack([joint_left_pad(np.arange(10, 20), 12), joint_left_pad(np.array([3]), 12)])
  fb = np.stack([joint_left_pad(np.where(np.arange(10) < 6, feedback.LIKED, feedback.DISLIKED), 12),
                 joint_left_pad(np.array([feedback.LIKED]), 12)])
  cfg = feedback.PretrainConfig(item_mask_rate=0.5, shuffle_order=shuffle_order, seed=1)
  batches = feedback.window_batches(ids, fb, cfg, mask_id=99, batch_size=2)
  seen = [next(batches) for _ in range(4)]  # two epochs
  for b in seen:
    for i, f, x in zip(b["history_ids"], b["history_feedback"], b["input_ids"]):
      row = 0 if (i > 3).any() else 1
      assert sorted(zip(i[i > 0].tolist(), f[i > 0].tolist())) == sorted(zip(ids[row][ids[row] > 0].tolist(),
                                                                           fb[row][ids[row] > 0].tolist()))
      assert ((i == 0) == (x == 0)).all() and set(x[(x != i)].tolist()) <= {99}  # padding stays, items hidden
  long_rows = [b["history_ids"][np.argmax((b["history_ids"] > 3).any(1))] for b in seen]
  assert any(not np.array_equal(r, ids[0]) for r in long_rows) == shuffle_order  # liked-then-disliked order gone
  assert 0 < np.mean([(b["input_ids"] == 99).sum() / (b["history_ids"] > 0).sum() for b in seen]) < 1
  again = feedback.window_batches(ids, fb, cfg, mask_id=99, batch_size=2)
  np.testing.assert_array_equal(next(again)["input_ids"], seen[0]["input_ids"])  # seeded

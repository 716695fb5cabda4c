"""Pretraining the fused model's encoder on behaviour sequences: next-feedback BCE + lambda x InfoNCE.

A target-aware encoder (`fusion.encoder_inputs`) predicts, at every item, whether the user liked it from
the items and likes before it; InfoNCE between augmented views (`joint.seq_cl_loss`) is the contrastive
part. Sequences never hold a valid or test target: MovieLens-100K timelines are cut before each user's
first valid/test target; for books (no raw ratings here) they are the histories of all prompts, targets
left out. The trained encoder and feedback head go into the fused model before rec tuning.
"""

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from clclm_jax.contrastive import joint
from clclm_jax.contrastive.fusion import FusedRec, encoder_inputs
from clclm_jax.data import paths, tallrec
from clclm_jax.data.records import Interaction
from clclm_jax.train import evaluate

LIKED, DISLIKED = 1, 2  # feedback codes of `fusion.FusedRec` (0 is padding / unknown)
Sequences = list[tuple[np.ndarray, np.ndarray]]  # (item ids, feedback codes), oldest first


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  epochs: int = 20
  batch_size: int = 256
  lr: float = 1e-3
  window: int = 11  # items per training window (history length + the target)
  stride: int = 5
  cl_weight: float = 0.1  # InfoNCE between augmented views; 0 turns it off
  item_mask_rate: float = 0.0  # items shown as the mask id, so likes are also learned from context (sparse items)
  shuffle_order: bool = False  # histories without time order (book: liked, then disliked): permute each epoch
  patience: int = 3  # epochs without a better validation AUC before stopping
  seed: int = 0


def _codes(likes: Sequence[bool]) -> np.ndarray:
  return np.asarray([LIKED if like else DISLIKED for like in likes], np.int32)


def behaviour_sequences(domain: str, splits: tallrec.TallrecSplits, root=None, *, timelines: bool = True) -> Sequences:
  """Behaviour timelines without any valid or test target (see the module docstring); the prompts' histories
  when `timelines` is False (splits from your own files, whose items are not MovieLens ids)."""
  held = list(splits.valid) + list(splits.test)
  if domain == "movie" and timelines:
    _, ratings = tallrec.read_movielens((paths.data_root() if root is None else pathlib.Path(root)) / "ml-100k")
    cut: dict[int, int] = {}
    for x in held:
      cut[x.user] = min(cut.get(x.user, x.timestamp), x.timestamp)
    by_user: dict[int, list[tuple[int, int, int]]] = {}
    for user, item, rating, ts in ratings:
      if ts < cut.get(user, np.iinfo(np.int64).max):
        by_user.setdefault(user, []).append((ts, item, rating))
    seqs = []
    for rows in by_user.values():
      rows.sort(key=lambda r: r[0])
      seqs.append((np.asarray([r[1] for r in rows], np.int32), _codes([r[2] > 3 for r in rows])))
    return seqs
  return [(np.asarray(x.history_ids, np.int32), _codes(x.history_likes))
          for x in list(splits.train) + held if x.history_ids]


def windows(seqs: Sequences, window: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded `[n, window]` ids and feedback: windows ending every `stride` items and at each end."""
  ids, fb = [], []
  for item_ids, codes in seqs:
    ends = sorted(set(range(min(window, len(item_ids)), len(item_ids) + 1, stride)) | {len(item_ids)})
    for end in ends:
      start = max(0, end - window)
      ids.append(joint.left_pad(item_ids[start:end], window))
      fb.append(joint.left_pad(codes[start:end], window))
  return np.stack(ids), np.stack(fb)


def shuffled(seqs: Sequences, rng: np.random.Generator) -> Sequences:
  """Each sequence in a fresh random order, so next-feedback reads a set of likes, not their arrangement."""
  out = []
  for item_ids, codes in seqs:
    perm = rng.permutation(len(item_ids))
    out.append((item_ids[perm], codes[perm]))
  return out


def feedback_loss(model: FusedRec, ids_bl: jax.Array, fb_bl: jax.Array, key: jax.Array | None,
                  item_mask_rate: float = 0.0) -> jax.Array:
  """Mean BCE of like(t) from the state at item t over the real items of target-aware windows; with a key,
  dropout is on and a share `item_mask_rate` of the items is replaced by the mask id."""
  x_ids, x_fb = encoder_inputs(ids_bl, fb_bl)
  if key is not None and item_mask_rate:
    key, mask_key = jax.random.split(key)
    hide_bl = jax.random.bernoulli(mask_key, item_mask_rate, ids_bl.shape) & (ids_bl > 0)
    x_ids = jnp.where(hide_bl, model.config.mask_id, x_ids)
  logits_bl = model.like_logit(model.encoder(x_ids, feedback_bl=x_fb, dropout_key=key))
  real_bl = (ids_bl > 0).astype(jnp.float32)
  bce_bl = optax.sigmoid_binary_cross_entropy(logits_bl, (fb_bl == LIKED).astype(jnp.float32))
  return jnp.sum(bce_bl * real_bl) / jnp.maximum(jnp.sum(real_bl), 1.0)


def _is_encoder_param(path, value) -> bool:
  return isinstance(value, nnx.Param) and path[0] in ("encoder", "feedback_head")


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "cl_weight", "item_mask_rate"), donate_argnums=(0, 1))
def train_step(params, opt_state, rest, ids_bl, fb_bl, key, *, graphdef, tx, cl_weight, item_mask_rate):
  """One AdamW step on the encoder and feedback head; returns (params, opt_state, loss)."""
  drop_key, cl_key = jax.random.split(key)

  def loss_fn(p):
    model = nnx.merge(graphdef, p, rest)
    loss = feedback_loss(model, ids_bl, fb_bl, drop_key, item_mask_rate)
    if cl_weight:
      loss += cl_weight * joint.seq_cl_loss(model, {"history_ids": ids_bl, "history_feedback": fb_bl}, cl_key)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef",))
def like_probability(params, rest, ids_bl, fb_bl, target_b, *, graphdef):
  """P(like target) from the target-aware encoder and the feedback head."""
  model = nnx.merge(graphdef, params, rest)
  z_be, _ = model.encode_history(ids_bl, fb_bl, target_b)
  return jax.nn.sigmoid(model.like_logit(z_be))


def prompt_arrays(xs: Sequence[Interaction], history_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  ids = np.stack([joint.left_pad(x.history_ids, history_len) for x in xs])
  fb = np.stack([joint.left_pad(_codes(x.history_likes), history_len) for x in xs])
  return ids, fb, np.asarray([x.target_id for x in xs], np.int32)


def like_probabilities(model: FusedRec, xs: Sequence[Interaction], batch_size: int = 512) -> np.ndarray:
  """The encoder's P(like target) for each prompt (no LLM): the hint that `hint_kd` distils."""
  graphdef, params, rest = nnx.split(model, _is_encoder_param, ...)
  ids, fb, target = prompt_arrays(xs, model.config.max_len - 1)
  return np.concatenate([np.asarray(like_probability(params, rest, ids[i:i + batch_size], fb[i:i + batch_size],
                                                     target[i:i + batch_size], graphdef=graphdef))
                         for i in range(0, len(xs), batch_size)])


def encoder_auc(model: FusedRec, xs: Sequence[Interaction], batch_size: int = 512) -> float:
  """AUC of the encoder alone (no LLM) on prompts: P(like target) against their labels."""
  return evaluate.auc(like_probabilities(model, xs, batch_size), np.asarray([x.label for x in xs]))


def pretrain(model: FusedRec, seqs: Sequences, valid: Sequence[Interaction], cfg: PretrainConfig,
             log: Callable[[str], None] = print) -> dict:
  """Trains `model.encoder` and `model.feedback_head` in place; keeps the epoch with the best valid AUC."""
  if not model.config.target_aware:
    raise ValueError("feedback pretraining needs FusionConfig(target_aware=True)")
  if not seqs:
    raise ValueError("no behaviour sequences to pretrain the encoder on (every prompt's history is empty): set "
                     "config.fusion.pretrain.epochs=0")
  ids, fb = windows(seqs, cfg.window, cfg.stride)
  batch_size = min(cfg.batch_size, len(ids))  # small data: one batch of every window rather than no step
  tx = optax.adamw(cfg.lr, weight_decay=0.0)
  graphdef, params, rest = nnx.split(model, _is_encoder_param, ...)
  opt_state = tx.init(params)
  rng, key = np.random.default_rng(cfg.seed), jax.random.key(cfg.seed)
  best, best_params, history, t0, bad = -1.0, jax.tree.map(np.array, params), [], time.time(), 0
  for epoch in range(1, cfg.epochs + 1):
    if cfg.shuffle_order:
      ids, fb = windows(shuffled(seqs, rng), cfg.window, cfg.stride)
    order, losses = rng.permutation(len(ids)), []
    for i in range(0, len(order) - batch_size + 1, batch_size):
      rows = order[i:i + batch_size]
      key, step_key = jax.random.split(key)
      params, opt_state, loss = train_step(params, opt_state, rest, ids[rows], fb[rows], step_key,
                                           graphdef=graphdef, tx=tx, cl_weight=cfg.cl_weight,
                                           item_mask_rate=cfg.item_mask_rate)
      losses.append(loss)
    nnx.update(model, params)
    auc = encoder_auc(model, valid)
    history.append({"epoch": epoch, "loss": float(np.mean(jax.device_get(losses))), "valid_auc": auc})
    log(f"  encoder epoch {epoch}: loss {history[-1]['loss']:.4f}, valid AUC {100 * auc:.2f} "
        f"({time.time() - t0:.0f}s)")
    if auc > best:
      best, best_params, bad = auc, jax.tree.map(np.array, params), 0
    else:
      bad += 1
      if bad >= cfg.patience:
        break
  nnx.update(model, best_params)
  return {"sequences": len(seqs), "windows": len(ids), "items": int(sum(len(s[0]) for s in seqs)),
          "best_valid_auc": best, "epochs": history, "seconds": time.time() - t0}

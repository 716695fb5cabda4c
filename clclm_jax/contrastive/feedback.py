"""Pretraining the fused model's encoder on behaviour sequences: next-feedback BCE + lambda x InfoNCE.

A target-aware encoder (`fusion.encoder_inputs`) predicts, at every item, whether the user liked it from
the items and likes before it; InfoNCE between augmented views (`losses.seq_cl_loss`) is the contrastive
part. Sequences never hold a valid or test target: MovieLens-100K timelines are cut before each user's
first valid/test target; for books (no raw ratings here) they are the histories of all prompts, targets
left out. The trained encoder and feedback head go into the fused model before rec tuning.
"""

import dataclasses
import functools
import pathlib
from collections.abc import Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.contrastive import losses  # noqa: F401 (registers seq_cl)
from clclm_jax.contrastive.fusion import FusedRec, encoder_inputs
from clclm_jax.data import fused, paths, tallrec
from clclm_jax.data.records import Interaction
from clclm_jax.train import evaluate, sharding, trainer
from clclm_jax.train.step import register_loss

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
      ids.append(fused.left_pad(item_ids[start:end], window))
      fb.append(fused.left_pad(codes[start:end], window))
  return np.stack(ids), np.stack(fb)


def feedback_loss(model: FusedRec, ids_bl: jax.Array, fb_bl: jax.Array, key: jax.Array | None,
                  input_ids_bl: jax.Array | None = None) -> jax.Array:
  """Mean BCE of like(t) from the state at item t over the real items of target-aware windows; dropout is on
  with a key. `input_ids_bl`: what the encoder reads in place of `ids_bl` (some items hidden as the mask id)."""
  x_ids, x_fb = encoder_inputs(ids_bl if input_ids_bl is None else input_ids_bl, fb_bl)
  logits_bl = model.like_logit(model.encoder(x_ids, feedback_bl=x_fb, dropout_key=key))
  real_bl = (ids_bl > 0).astype(jnp.float32)
  bce_bl = optax.sigmoid_binary_cross_entropy(logits_bl, (fb_bl == LIKED).astype(jnp.float32))
  return jnp.sum(bce_bl * real_bl) / jnp.maximum(jnp.sum(real_bl), 1.0)


@register_loss("feedback")
def feedback_term(model: FusedRec, batch, key: jax.Array) -> jax.Array:
  """`feedback_loss` of a `window_batches` batch (history ids and likes; `input_ids` with items hidden)."""
  return feedback_loss(model, batch["history_ids"], batch["history_feedback"], key, batch.get("input_ids"))


def encoder_params(path, value) -> bool:
  """The nnx filter of what encoder pretraining trains: the encoder and its feedback head."""
  return isinstance(value, nnx.Param) and path[0] in ("encoder", "feedback_head")


def window_batches(ids: np.ndarray, fb: np.ndarray, cfg: "PretrainConfig", mask_id: int,
                   batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Endless shuffled batches of windows (a checkpointable grain iterator). Per window and epoch, from grain's
  per-element generator: with `shuffle_order` its items are permuted (likes kept with their items), and a share
  `item_mask_rate` of them is shown to the encoder as `mask_id` (`input_ids`), so likes are also read from
  context. `history_ids` stay unmasked for the contrastive views."""
  def example(j: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x_ids, x_fb = ids[j].copy(), fb[j].copy()
    real = np.flatnonzero(x_ids > 0)
    if cfg.shuffle_order:
      perm = rng.permutation(real)
      x_ids[real], x_fb[real] = x_ids[perm], x_fb[perm]
    hide = (rng.random(len(x_ids)) < cfg.item_mask_rate) & (x_ids > 0)
    return {"history_ids": x_ids, "history_feedback": x_fb, "input_ids": np.where(hide, mask_id, x_ids)}

  ds = grain.MapDataset.range(len(ids)).shuffle(cfg.seed).repeat(None).random_map(example, seed=cfg.seed)
  return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())


@functools.partial(jax.jit, static_argnames=("graphdef",))
def like_probability(params, rest, ids_bl, fb_bl, target_b, *, graphdef):
  """P(like target) from the target-aware encoder and the feedback head."""
  model = nnx.merge(graphdef, params, rest)
  z_be, _ = model.encode_history(ids_bl, fb_bl, target_b)
  return jax.nn.sigmoid(model.like_logit(z_be))


def prompt_arrays(xs: Sequence[Interaction], history_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  ids = np.stack([fused.left_pad(x.history_ids, history_len) for x in xs])
  fb = np.stack([fused.left_pad(_codes(x.history_likes), history_len) for x in xs])
  return ids, fb, np.asarray([x.target_id for x in xs], np.int32)


def like_probabilities(model: FusedRec, xs: Sequence[Interaction], batch_size: int = 512) -> np.ndarray:
  """The encoder's P(like target) for each prompt (no LLM): the hint that `hint_kd` distils."""
  graphdef, params, rest = nnx.split(model, encoder_params, ...)
  ids, fb, target = prompt_arrays(xs, model.config.max_len - 1)
  return np.concatenate([np.asarray(like_probability(params, rest, ids[i:i + batch_size], fb[i:i + batch_size],
                                                     target[i:i + batch_size], graphdef=graphdef))
                         for i in range(0, len(xs), batch_size)])


def encoder_auc(model: FusedRec, xs: Sequence[Interaction], batch_size: int = 512) -> float:
  """AUC of the encoder alone (no LLM) on prompts: P(like target) against their labels."""
  return evaluate.auc(like_probabilities(model, xs, batch_size), np.asarray([x.label for x in xs]))


def pretrain_stage(model: FusedRec, seqs: Sequences, valid: Sequence[Interaction], cfg: PretrainConfig,
                   workdir: pathlib.Path, config=None) -> trainer.Stage:
  """Encoder pretraining as a stage of the one trainer: the encoder and feedback head train on behaviour
  windows (next-feedback BCE + `cl_weight` x InfoNCE), validated each epoch by the encoder's AUC on the
  `valid` prompts, stopping after `patience` epochs without a better one (the best epoch is kept)."""
  if not model.config.target_aware:
    raise ValueError("feedback pretraining needs FusionConfig(target_aware=True)")
  if not seqs:
    raise ValueError("no behaviour sequences to pretrain the encoder on (every prompt's history is empty): set "
                     "config.fusion.pretrain.epochs=0")
  ids, fb = windows(seqs, cfg.window, cfg.stride)
  batch_size = min(cfg.batch_size, len(ids))  # small data: one batch of every window rather than no step
  per_epoch = len(ids) // batch_size
  optim = ConfigDict(dict(lr=cfg.lr, warmup_steps=0, schedule="constant", max_grad_norm=0.0, b1=0.9, b2=0.999,
                          weight_decay=0.0))
  return trainer.Stage(
      "encoder", pathlib.Path(workdir),
      lambda: window_batches(ids, fb, cfg, model.config.mask_id, batch_size),
      {"feedback": 1.0, "seq_cl": cfg.cl_weight}, cfg.epochs * per_epoch, optim, batch_size, batch_size,
      trains=encoder_params, validate=lambda m: {"auc": encoder_auc(m, valid)}, eval_every=per_epoch,
      patience=cfg.patience, checkpoint_every=per_epoch, seed=cfg.seed, config=config,
      title=f"encoder pretraining: {len(seqs)} sequences, {len(ids)} windows, {per_epoch} steps an epoch")


def pretrain(model: FusedRec, seqs: Sequences, valid: Sequence[Interaction], cfg: PretrainConfig,
             workdir: pathlib.Path, mesh=None) -> dict:
  """Runs `pretrain_stage` on `model` (in place; the best epoch's parameters kept) on `mesh` (default: every
  device on the data axis); returns the stage summary with the encoder's best valid AUC."""
  mesh = mesh or sharding.make_mesh((-1, 1, 1))
  trainer.place(model, mesh)
  summary = trainer.run_stage(pretrain_stage(model, seqs, valid, cfg, workdir), model, mesh)
  return summary | {"best_valid_auc": summary["valid_auc"], "sequences": len(seqs)}

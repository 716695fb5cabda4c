"""CLCLMRec rec tuning: fused-prompt batches and the joint losses (registered by name for `train.step`).

Losses, each weighted by `config.loss_weights[name]` and off when absent:
  `text_lm`   next-token CE on the text-only prompt where `loss_mask` is 1 (LM head on those rows only);
  `fused_lm`  the same on the fused prompt (soft tokens at the placeholders);
  `seq_cl`    InfoNCE between two augmented views (data/augment.py) of the history through the encoder;
  `text_cl`   InfoNCE between the LLM's mean-pooled states of two text views (data/textviews.py);
  `align_cl`  CALRec-style InfoNCE between the LLM's pooled history span and the encoder's user state;
  `hint_kd`   cross-entropy of the fused prompt's (Yes, No) answer against the encoder's P(like) (distillation).
Stage 1 trains `text_lm` on text-only prompts; stage 2 the others on fused prompts.
"""

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import functools
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from clclm_jax.contrastive import losses
from clclm_jax.contrastive.fusion import FEEDBACK_BITS, FusedRec
from clclm_jax.data import augment, pipeline, prompts, textviews, tokenize
from clclm_jax.data.errors import DataError
from clclm_jax.data.records import Catalogue, Interaction
from clclm_jax.model.llama import take_rows
from clclm_jax.train.step import register_loss

BEHAVIOR_LINE = "User Behavior Embedding:"
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """How examples are rendered: `num_soft_tokens=0` gives TALLRec's text-only prompt."""

  domain: str
  placeholder: str  # text of a token the tokenizer keeps whole, e.g. "<reponame>" for SmolLM2
  placeholder_id: int
  num_soft_tokens: int = 0
  cutoff_len: int = 512
  train_on_inputs: bool = False
  template: str = "alpaca"
  history_len: int = 10
  view_len: int = 128  # text views keep their last `view_len` tokens

  def with_soft_tokens(self, k: int) -> "PromptSpec":
    return dataclasses.replace(self, num_soft_tokens=k)


def fused_input(x: Interaction, catalogue: Catalogue, domain: str, slots: str = "") -> str:
  """TALLRec's input text; with `slots` a behaviour line holding them goes before the question."""
  text = prompts.render_tallrec(x, catalogue, domain)
  if not slots:
    return text
  history, question = text.rsplit("\n", 1)
  return f"{history}\n{BEHAVIOR_LINE}{slots}\n{question}"


def left_pad(values: Sequence[int], length: int) -> np.ndarray:
  values = list(values)[-length:]
  return np.asarray([0] * (length - len(values)) + values, np.int32)


def encode_fused(tokenizer: tokenize.Tokenizer, x: Interaction, catalogue: Catalogue, spec: PromptSpec,
                 index: int) -> Batch:
  """One example: tokens with k placeholders, loss mask (never on placeholders), history ids, likes, span."""
  tmpl = prompts.template(spec.template)
  for drop in range(len(x.history_ids) + 1):  # Oldest history items go first, as in tokenize.encode_interaction.
    y = x.drop_oldest(drop)
    prompt = tmpl.prompt(prompts.instruction(spec.domain),
                         fused_input(y, catalogue, spec.domain, spec.placeholder * spec.num_soft_tokens))
    try:
      enc = tokenize.encode_example(tokenizer, prompt, prompts.ANSWERS[y.label], cutoff_len=spec.cutoff_len,
                                    train_on_inputs=spec.train_on_inputs)
      break
    except tokenize.TooLong:
      continue
  else:
    raise DataError(None, index, "even with no history the fused prompt is too long", "raise cutoff_len")
  slots = int((enc.tokens == spec.placeholder_id).sum())
  if slots != spec.num_soft_tokens:
    raise DataError(None, index, f"prompt holds {slots} tokens of placeholder id {spec.placeholder_id}, "
                    f"expected {spec.num_soft_tokens}",
                    "choose a placeholder the tokenizer keeps as one special token ('<reponame>' for SmolLM2)")
  start = prompt.index("User Preference:")
  end = prompt.index("\n", prompt.index("User Unpreference:"))
  history_mask = np.zeros(len(enc.tokens), np.int32)
  history_mask[len(tokenizer.encode(prompt[:start])):len(tokenizer.encode(prompt[:end]))] = 1
  return {"tokens": enc.tokens, "loss_mask": enc.loss_mask * (enc.tokens != spec.placeholder_id),
          "answer_index": np.int32(enc.answer_index), "label": np.int32(y.label), "user_ids": np.int32(y.user),
          "index": np.int32(index), "target_ids": np.int32(y.target_id),
          "history_ids": left_pad(y.history_ids, spec.history_len),
          "history_feedback": left_pad([1 if like else 2 for like in y.history_likes], spec.history_len),
          "history_mask": history_mask}


def encode_views(tokenizer: tokenize.Tokenizer, x: Interaction, catalogue: Catalogue, spec: PromptSpec,
                 rng: np.random.Generator) -> Batch:
  """Two text views of the history (crop / mask / reorder), without the target that both would share."""
  views = textviews.two_views(x, catalogue, spec.domain, rng)
  ids = [np.asarray(tokenizer.encode(v.rsplit("\n", 1)[0])[-spec.view_len:], np.int32) for v in views]
  return {"view1_tokens": ids[0], "view2_tokens": ids[1]}


def _pad_rows(rows: Sequence[np.ndarray], b: int, t: int) -> np.ndarray:
  out = np.zeros((b, t), np.int32)
  for r, row in enumerate(rows):
    out[r, :len(row)] = row
  return out


def target_index(loss_mask_bt: np.ndarray, multiple: int = 8) -> np.ndarray:
  """Positions `[b, n]` where `loss_mask` is 1 (n a multiple of `multiple`), padded with 0 (never a target)."""
  rows = [np.flatnonzero(m[1:]) + 1 for m in loss_mask_bt]
  n = multiple * max(1, math.ceil(max(len(r) for r in rows) / multiple))
  return _pad_rows(rows, len(rows), n)


def collate_fused(examples: Sequence[Batch], *, pad_multiple: int = 16, batch_size: int | None = None,
                  width: int | None = None) -> Batch:
  """`pipeline.collate` plus `history_feedback`, `history_mask`, `target_index`, `target_ids` and, when present,
  text views."""
  batch = pipeline.collate(examples, pad_multiple=pad_multiple, batch_size=batch_size, width=width)
  b, t = batch["tokens"].shape
  batch["target_index"] = target_index(batch["loss_mask"])
  batch["history_feedback"] = _pad_rows([e["history_feedback"] for e in examples], b,
                                        examples[0]["history_feedback"].shape[0])
  batch["history_mask"] = _pad_rows([e["history_mask"] for e in examples], b, t)
  batch["target_ids"] = _pad_rows([e["target_ids"][None] for e in examples], b, 1)[:, 0]
  if "view1_tokens" in examples[0]:
    views = [e[f"view{i}_tokens"] for e in examples for i in (1, 2)]
    tv = pad_multiple * math.ceil(max(len(v) for v in views) / pad_multiple)
    for i in (1, 2):
      rows = [e[f"view{i}_tokens"] for e in examples]
      batch[f"view{i}_tokens"] = _pad_rows(rows, b, tv)
      batch[f"view{i}_mask"] = _pad_rows([np.ones_like(r) for r in rows], b, tv)
  return batch


def train_batches(interactions: Sequence[Interaction], catalogue: Catalogue, tokenizer, spec: PromptSpec, *,
                  batch_size: int, seed: int, views: bool = False, pad_multiple: int = 16) -> Iterator[Batch]:
  """Endless shuffled batches; text views are redrawn per epoch from grain's per-element generator."""
  def example(item, rng):
    i, x = item
    e = encode_fused(tokenizer, x, catalogue, spec, i)
    return e | encode_views(tokenizer, x, catalogue, spec, rng) if views else e

  ds = grain.MapDataset.source(list(enumerate(interactions))).shuffle(seed).repeat(None)
  ds = ds.random_map(example, seed=seed)
  return iter(ds.batch(batch_size, drop_remainder=True,
                       batch_fn=functools.partial(collate_fused, pad_multiple=pad_multiple)).to_iter_dataset())


def eval_batches(interactions: Sequence[Interaction], catalogue: Catalogue, tokenizer, spec: PromptSpec, *,
                 batch_size: int, pad_multiple: int = 16, max_widths: int = 0) -> grain.MapDataset:
  """Every interaction once (this process's shard), sorted by length, the last batch filled with index -1
  rows; padded as `pipeline.eval_dataset` pads (at most `max_widths` widths, or multiples of `pad_multiple`)."""
  examples = grain.MapDataset.source(list(enumerate(interactions))).map(
      lambda ix: encode_fused(tokenizer, ix[1], catalogue, spec, ix[0]))
  return pipeline.eval_dataset(examples, batch_size=batch_size, pad_multiple=pad_multiple, max_widths=max_widths,
                               collate_fn=collate_fused)


# --- Losses ----------------------------------------------------------------------------------------

def _target_ce(model: FusedRec, h_btd: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
  """Mean next-token CE at `target_index` (0 = padding); the LM head runs on those rows only."""
  idx_bn = batch["target_index"]
  h_bnd = jnp.take_along_axis(h_btd, jnp.maximum(idx_bn - 1, 0)[..., None], axis=1)
  targets_bn = jnp.take_along_axis(batch["tokens"], idx_bn, axis=1)
  ce_bn = optax.softmax_cross_entropy_with_integer_labels(model.lm_logits(h_bnd), targets_bn)
  w_bn = (idx_bn > 0).astype(jnp.float32)
  return jnp.sum(ce_bn * w_bn) / jnp.maximum(jnp.sum(w_bn), 1.0)


def _masked_mean(h_btd: jax.Array, mask_bt: jax.Array) -> jax.Array:
  m_bt1 = mask_bt[..., None].astype(jnp.float32)
  return (h_btd.astype(jnp.float32) * m_bt1).sum(1) / jnp.maximum(m_bt1.sum(1), 1.0)


def left_to_right(seq_bl: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Left-padded rows -> right-padded rows (the layout of data/augment.py) and their lengths."""
  l = seq_bl.shape[1]
  n_b = (seq_bl > 0).sum(1)
  idx_bl = (jnp.arange(l)[None] + (l - n_b)[:, None]) % l
  return jnp.take_along_axis(seq_bl, idx_bl, axis=1), n_b


@register_loss("text_lm", per_token=("text_lm",))
def text_lm_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """Next-token CE of the text-only prompt: step.py's `lm` with the LM head on the target rows only."""
  h_btd = model.hidden_states(batch["tokens"], batch.get("positions"), batch["attention_mask"], dropout_key=key)
  return _target_ce(model, h_btd, batch)


def fused_hidden(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array | None = None, **kw) -> jax.Array:
  """`model.hidden_states` of the batch's fused prompt (soft tokens from its history, likes and target)."""
  return model.hidden_states(batch["tokens"], batch.get("positions"), batch["attention_mask"],
                             history_ids_bl=batch["history_ids"], feedback_bl=batch["history_feedback"],
                             target_ids_b=batch["target_ids"], dropout_key=key, **kw)


@register_loss("fused_lm", "hint_kd", per_token=("fused_lm",))
def fused_losses(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array,
                 names: Sequence[str]) -> dict[str, jax.Array]:
  """The fused prompt's terms from one forward: `fused_lm` (its next-token CE) and `hint_kd` (CE of its
  softmax over the (Yes, No) logits against the encoder's P(like), the answer hint's p held fixed and
  without dropout: distils the encoder's ranking into the answer)."""
  c = model.config
  if "hint_kd" in names and c.answer_hint is None:
    raise ValueError("the hint_kd loss needs FusionConfig.answer_hint (the (Yes, No) token ids)")
  h_btd = fused_hidden(model, batch, key)
  terms = {"fused_lm": _target_ce(model, h_btd, batch)} if "fused_lm" in names else {}
  if "hint_kd" in names:
    h_bd = take_rows(h_btd, batch["answer_index"])[:, 0]
    logp_b2 = jax.nn.log_softmax(model.lm_logits(h_bd)[:, jnp.asarray(c.answer_hint)].astype(jnp.float32), -1)
    z_be, _ = model.encode_history(batch["history_ids"], batch["history_feedback"], batch["target_ids"])
    p_b = jax.lax.stop_gradient(jax.nn.sigmoid(c.hint_scale * model.like_logit(z_be)))
    terms["hint_kd"] = -jnp.mean(p_b * logp_b2[:, 0] + (1 - p_b) * logp_b2[:, 1])
  return terms


@register_loss("seq_cl")
def seq_cl_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """InfoNCE between two augmented views of each history; ids and likes travel together (id * 4 + like)."""
  c = model.config
  aug_key, drop_key = jax.random.split(key)
  packed_bl, n_b = left_to_right(batch["history_ids"] * FEEDBACK_BITS + batch["history_feedback"])
  v1_bl, _, v2_bl, _ = augment.two_views_batch(
      aug_key, packed_bl, n_b, model.packed_corr(), mask_id=c.mask_id * FEEDBACK_BITS,
      short_threshold=c.short_threshold, eta=c.crop_eta, gamma=c.mask_gamma, beta=c.reorder_beta,
      insert_rate=c.insert_rate, substitute_rate=c.substitute_rate)
  views_bl = jnp.concatenate([v1_bl, v2_bl])
  z_be, _ = model.encode_history(views_bl // FEEDBACK_BITS, views_bl % FEEDBACK_BITS, dropout_key=drop_key)
  b = v1_bl.shape[0]
  return losses.info_nce(z_be[:b], z_be[b:], temperature=c.seq_temperature, similarity="cosine")


@register_loss("text_cl")
def text_cl_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """InfoNCE between the LLM's mean-pooled final states of two text views of the same user (one pass)."""
  tokens_bt = jnp.concatenate([batch["view1_tokens"], batch["view2_tokens"]])
  mask_bt = jnp.concatenate([batch["view1_mask"], batch["view2_mask"]])
  z_bd = _masked_mean(model.llm.hidden_states(tokens_bt, None, mask_bt, dropout_key=key), mask_bt)
  b = batch["view1_tokens"].shape[0]
  return losses.info_nce(z_bd[:b], z_bd[b:], temperature=model.config.text_temperature, similarity="cosine")


@register_loss("align_cl")
def align_cl_loss(model: FusedRec, batch: Mapping[str, jax.Array], key: jax.Array) -> jax.Array:
  """InfoNCE between the LLM's pooled history span (before the placeholders) and the encoder's user state."""
  llm_key, enc_key = jax.random.split(key)
  h_btd = model.llm.hidden_states(batch["tokens"], batch.get("positions"), batch["attention_mask"],
                                  dropout_key=llm_key)
  v_be = model.align_proj(_masked_mean(h_btd, batch["history_mask"]))
  z_be, _ = model.encode_history(batch["history_ids"], batch["history_feedback"], dropout_key=enc_key)
  return losses.info_nce(v_be, z_be, temperature=model.config.align_temperature, similarity="cosine")

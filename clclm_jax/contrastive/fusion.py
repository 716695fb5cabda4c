"""CLCLMRec fusion: a sequence encoder's user representation as k soft tokens inside the LLM prompt.

The prompt carries k placeholder tokens (one reserved token id, e.g. `<reponame>` for SmolLM2) on a
line of their own; their input embeddings are replaced by a trained projector (LLaRA / CoLLM style)
applied to the SASRec encoder's output over the user's history ids and likes. Without a history
the module is exactly its LLM, so stage-1 (text-only) training and the stage-2 fused model share it.
With `target_aware`, the encoder also reads the target item (see `encoder_inputs`) and a feedback head
on its state predicts the like, which `contrastive/feedback.py` pretrains on behaviour sequences.
Residual fusion (`FusionConfig.mode='residual'`) answers with that head's logit plus what LoRA changes in the
LLM's Yes-minus-No logit on the prompt (`FusedRec.residual_logit`): with LoRA at zero it is its encoder, and the
LoRA only has to learn what the encoder does not know.
"""

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from clclm_jax.contrastive.encoder import SeqEncoder, named_linear, pool
from clclm_jax.data import prompts
from clclm_jax.data.records import Catalogue
from clclm_jax.model.llama import Llama

LECUN = nnx.initializers.lecun_normal()  # nnx.Linear's default kernel initializer
FEEDBACK_BITS = 4  # history ids are packed as id * 4 + feedback (0 pad/unknown, 1 liked, 2 disliked)


def text_embeddings(llm: Llama, tokenizer, texts: Sequence[str], batch_size: int = 64,
                    max_tokens: int = 32) -> np.ndarray:
  """`[n, d]`: the LLM's final-normed hidden states averaged over each text's tokens, unit length; texts are
  batched by length, padded to half or all of `max_tokens` (two compiled shapes: a compile costs more than the
  padding), and padding never reaches a text's states."""
  ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] or [0] for t in texts]
  forward = jax.jit(lambda tokens, mask: llm.hidden_states(tokens, None, mask))
  out = np.zeros((len(texts), llm.config.hidden_size), np.float32)
  order = np.argsort([len(t) for t in ids], kind="stable")
  for start in tqdm.trange(0, len(order), batch_size, desc="text embeddings", disable=len(order) <= batch_size):
    rows = order[start:start + batch_size]
    width = max_tokens // 2 if max(len(ids[k]) for k in rows) <= max_tokens // 2 else max_tokens
    tokens, mask = np.zeros((batch_size, width), np.int32), np.zeros((batch_size, width), np.int32)
    for j, k in enumerate(rows):
      tokens[j, :len(ids[k])], mask[j, :len(ids[k])] = ids[k], 1
    h = np.asarray(forward(tokens, mask), np.float32)
    for j, k in enumerate(rows):
      out[k] = h[j, :len(ids[k])].mean(axis=0)
  return out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-9)


def item_text_table(llm: Llama, tokenizer, catalogue: Catalogue, domain: str) -> np.ndarray:
  """`[max_id + 2, d]` for `FusedRec(item_init=...)`: each item's text as the prompts write it, embedded by
  the LLM (`text_embeddings`); the padding row, the mask row and ids without an item stay zero."""
  items = list(catalogue)
  table = np.zeros((catalogue.max_id + 2, llm.config.hidden_size), np.float32)
  table[[it.id for it in items]] = text_embeddings(llm, tokenizer, [prompts.render_item(it, domain) for it in items])
  return table


@dataclasses.dataclass(frozen=True)
class FusionConfig:
  """Soft-token placement, encoder shape, and the contrastive losses' settings (read by `losses.py`)."""

  num_items: int
  placeholder_id: int
  num_soft_tokens: int = 4
  source: str = "user"  # "user": MLP(pooled user state) -> k tokens; "items": last k item states, one token each
  projector_hidden: int = 256
  encoder_hidden: int = 64
  encoder_layers: int = 2
  encoder_heads: int = 2
  encoder_dropout: float = 0.2
  max_len: int = 50
  pooling: str = "mean"
  seq_temperature: float = 0.2
  text_temperature: float = 0.1
  align_temperature: float = 0.1
  crop_eta: float = 0.6
  mask_gamma: float = 0.3
  reorder_beta: float = 0.6
  insert_rate: float = 0.4
  substitute_rate: float = 0.1
  short_threshold: int = 4
  target_aware: bool = False  # the encoder reads the target item last; its state there is the user signal
  # (yes_id, no_id): the first soft token is p * E[yes] + (1 - p) * E[no], p = the feedback head's
  # P(like target); a hint in the LLM's own answer vocabulary, readable before the projector has learned.
  answer_hint: tuple[int, int] | None = None
  # p = sigmoid(hint_scale x like logit): > 1 spreads a weak encoder's P(like) over more of the Yes..No line.
  hint_scale: float = 1.0
  # False: the encoder runs without dropout when it fills the prompt's soft tokens in training, so the
  # LLM learns from the hint it will see at test time (seq_cl keeps its dropout either way).
  prompt_dropout: bool = True
  # "soft_tokens": the answer is the LLM's (Yes, No) softmax on the prompt (with soft tokens where it has
  # placeholders). "residual": the answer logit is the encoder's like-logit plus what LoRA changes in the LLM's
  # Yes-minus-No logit on the same prompt (`residual_logit`): with LoRA at zero the model is its encoder.
  mode: str = "soft_tokens"
  # residual: learned scalar weights on the encoder part and the LLM part, both 1 at the start.
  residual_gate: bool = False
  yes_no: tuple[int, int] | None = None  # the answer token ids the residual logit reads

  def __post_init__(self):
    if self.mode not in ("soft_tokens", "residual"):
      raise ValueError(f"FusionConfig.mode={self.mode!r}: use 'soft_tokens' or 'residual'")
    if self.mode == "residual" and not (self.target_aware and self.yes_no is not None):
      raise ValueError("FusionConfig.mode='residual' needs target_aware=True (its feedback head is the encoder's "
                       "logit) and yes_no (the answer token ids)")
    if self.residual_gate and self.mode != "residual":
      raise ValueError("FusionConfig.residual_gate needs mode='residual'")
    if self.source not in ("user", "items"):
      raise ValueError(f"FusionConfig.source={self.source!r}: use 'user' or 'items'")
    if self.num_soft_tokens < 1:
      raise ValueError(f"FusionConfig.num_soft_tokens={self.num_soft_tokens} must be >= 1")
    if self.answer_hint is not None and not (self.target_aware and self.source == "user"):
      raise ValueError("FusionConfig.answer_hint needs target_aware=True and source='user'")

  @property
  def mask_id(self) -> int:
    """The encoder's mask row (after the items); row 0 is padding."""
    return self.num_items + 1


def lora_off(llm: Llama) -> Llama:
  """The same LLM with every LoRA weight zero: exactly the frozen base (the LoRA path adds 0); the copy shares the
  base weights, and nothing flows back to the LoRA weights through it."""
  graphdef, lora, rest = nnx.split(llm, nnx.LoRAParam, ...)
  return nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, lora), rest)


def residual_trains(soft_tokens: bool, loss_weights: Mapping[str, float] | None = None):
  """The nnx filter of what a residual fused stage trains: LoRA and the gates, the projector when the prompt holds
  soft tokens, and `align_proj` when the stage's `loss_weights` train `align_cl` (else the LLM would be aligned
  through a fixed random map). The encoder and its feedback head stay as pretrained: the model's starting point."""
  align = (loss_weights or {}).get("align_cl", 0.0) > 0
  parts = ("residual_gates",) + ("projector",) * soft_tokens + ("align_proj",) * align
  return lambda path, value: isinstance(value, nnx.LoRAParam) or (isinstance(value, nnx.Param) and path[0] in parts)


def at_its_encoder(model: "FusedRec") -> bool:
  """Whether a residual model answers exactly as its encoder: every LoRA B at zero (the LLM part is then zero) and
  the gates, if any, at one. So it starts, and so it ends when no trained step is kept: its scores are then the
  encoder's (`feedback.like_probabilities`), without the two LLM passes."""
  if not model.residual:
    return False
  gates = model.residual_gates
  return (all(not np.any(np.asarray(lin.lora_b[...])) for _, lin in model.llm.projections() if lin.lora_b is not None)
          and (gates is None or bool(np.all(np.asarray(gates[...]) == 1.0))))


def yes_minus_no(llm: Llama, yes_no: tuple[int, int], x_btd: jax.Array, *, positions_bt, attention_mask_bt, rows_b,
                 dropout_key=None, prefix_kv=None) -> jax.Array:
  """`[b]` float32: the Yes logit minus the No logit of `llm` on input embeddings `x_btd`, at `rows_b` only."""
  h_bd = llm.hidden_states(None, positions_bt, attention_mask_bt, inputs_embeds_btd=x_btd, dropout_key=dropout_key,
                           prefix_kv=prefix_kv, rows_b=rows_b)
  logits_b2 = llm.lm_logits(h_bd)[:, jnp.asarray(yes_no)].astype(jnp.float32)
  return logits_b2[:, 0] - logits_b2[:, 1]


class ItemCorrelation(nnx.Variable):
  """A frozen int32 table `[num_items + 2, top_k]` of correlated item ids (ItemCF-IUF), for augmentation."""


def place_soft_tokens(x_btd: jax.Array, tokens_bt: jax.Array, soft_bkd: jax.Array,
                      placeholder_id: int) -> jax.Array:
  """Replaces the embedding of the j-th placeholder of each row by `soft_bkd[:, j]`; other rows pass through."""
  is_slot_bt = tokens_bt == placeholder_id
  slot_bt = jnp.clip(jnp.cumsum(is_slot_bt, axis=1) - 1, 0, soft_bkd.shape[1] - 1)
  soft_btd = jnp.take_along_axis(soft_bkd, slot_bt[..., None], axis=1).astype(x_btd.dtype)
  return jnp.where(is_slot_bt[..., None], soft_btd, x_btd)


def last_states(h_bld: jax.Array, mask_bl: jax.Array, k: int) -> jax.Array:
  """The states of the k most recent real items `[b, k, d]`, oldest first; zeros where a history is shorter."""
  back_bl = jnp.flip(jnp.cumsum(jnp.flip(mask_bl, 1), axis=1), 1)  # 1 for the most recent item
  onehot_bkl = (back_bl[:, None, :] == jnp.arange(k, 0, -1)[None, :, None]) & mask_bl[:, None, :]
  return jnp.einsum("bkl,bld->bkd", onehot_bkl.astype(h_bld.dtype), h_bld)


def encoder_inputs(ids_bl: jax.Array, feedback_bl: jax.Array,
                   target_b: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The target-aware layout of left-padded rows: each item carries the previous item's feedback, so the
  state at item t has seen likes < t only and can predict like(t); the target, when given, goes last."""
  shifted_bl = jnp.concatenate([jnp.zeros_like(feedback_bl[:, :1]), feedback_bl], axis=1)
  if target_b is None:
    return ids_bl, shifted_bl[:, :-1]
  return jnp.concatenate([ids_bl, target_b[:, None].astype(ids_bl.dtype)], axis=1), shifted_bl


class Projector(nnx.Module):
  """MLP (Linear, GELU, Linear) into the LLM input space, RMS-normalised to the token embeddings' scale."""

  def __init__(self, d_in: int, d_out: int, num_out: int, hidden: int, out_rms: float, *, rngs: nnx.Rngs):
    self.num_out, self.d_out, self.out_rms = num_out, d_out, out_rms
    self.up_proj = named_linear(d_in, hidden, ("enc_embed", "mlp"), rngs=rngs, kernel_init=LECUN)
    self.down_proj = named_linear(hidden, num_out * d_out, ("mlp", "embed"), rngs=rngs,
                                  kernel_init=nnx.initializers.normal(0.02))

  def __call__(self, z_xd: jax.Array) -> jax.Array:
    y = self.down_proj(jax.nn.gelu(self.up_proj(z_xd)))
    y = y.reshape(*z_xd.shape[:-1], self.num_out, self.d_out)
    return y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-6) * self.out_rms


class FusedRec(nnx.Module):
  """LLM (frozen base + LoRA) + SASRec encoder + projector to k soft tokens + an alignment head.

  Called like `Llama` (`tokens_bt, positions_bt, attention_mask_bt`); passing `history_ids_bl`
  (left-padded, most recent last) and `feedback_bl` fills the placeholders with soft tokens.
  """

  def __init__(self, llm: Llama, cfg: FusionConfig, *, item_corr=None, item_init=None, rngs: nnx.Rngs):
    """`item_init` `[num_items + 2, d]` (e.g. `item_text_table`): a frozen item table the encoder projects,
    instead of learned item ids."""
    self.config = cfg
    self.llm = llm
    d_llm = llm.config.hidden_size
    self.encoder = SeqEncoder(cfg.num_items + 2, hidden=cfg.encoder_hidden, num_layers=cfg.encoder_layers,
                              num_heads=cfg.encoder_heads, max_len=cfg.max_len, dropout=cfg.encoder_dropout,
                              attn_dropout=cfg.encoder_dropout, item_init=item_init,
                              freeze_item_init=item_init is not None, use_feedback=True, rngs=rngs)
    table_vd = llm.embed_tokens.embedding[...].astype(jnp.float32)
    out_rms = float(jnp.sqrt(jnp.mean(table_vd * table_vd)))
    per_input = cfg.num_soft_tokens if cfg.source == "user" else 1
    self.projector = Projector(cfg.encoder_hidden, d_llm, per_input, cfg.projector_hidden, out_rms, rngs=rngs)
    self.align_proj = named_linear(d_llm, cfg.encoder_hidden, ("embed", "enc_embed"), rngs=rngs, kernel_init=LECUN)
    self.feedback_head = named_linear(cfg.encoder_hidden, 1, ("enc_embed", None), rngs=rngs, kernel_init=LECUN)
    if item_corr is None:
      item_corr = jnp.arange(cfg.num_items + 2, dtype=jnp.int32)[:, None]
    if item_corr.shape[0] != cfg.num_items + 2:
      raise ValueError(f"item_corr has {item_corr.shape[0]} rows, expected num_items + 2 = {cfg.num_items + 2}")
    self.item_corr = ItemCorrelation(jnp.asarray(item_corr, jnp.int32))
    self.configure(cfg)

  def configure(self, cfg: FusionConfig) -> None:
    """Sets the config (an ablation may change it between stages); adds the residual gates (1, 1) when it asks
    for them and they are missing, drops them when it does not."""
    if cfg.residual_gate and getattr(self, "residual_gates", None) is None:
      self.residual_gates = nnx.Param(jnp.ones(2, jnp.float32))  # (encoder part, LLM part)
    elif not cfg.residual_gate:
      self.residual_gates = nnx.data(None)
    self.config = cfg

  @property
  def residual(self) -> bool:
    return self.config.mode == "residual"

  def encode_history(self, history_ids_bl: jax.Array, feedback_bl: jax.Array, target_ids_b: jax.Array | None = None,
                     *, dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(user representation `[b, e]`, per-position states `[b, l, e]`) from ids and likes; target-aware
    encoders read `encoder_inputs` and the representation is the last state (the target's when given)."""
    if self.config.target_aware:
      history_ids_bl, feedback_bl = encoder_inputs(history_ids_bl, feedback_bl, target_ids_b)
    h_ble = self.encoder(history_ids_bl, feedback_bl=feedback_bl, dropout_key=dropout_key)
    how = "last" if self.config.target_aware else self.config.pooling
    return pool(h_ble, history_ids_bl > 0, how), h_ble

  def like_logit(self, h_xe: jax.Array) -> jax.Array:
    """The feedback head: logit of a like from target-aware encoder states."""
    return self.feedback_head(h_xe)[..., 0]

  def soft_tokens(self, history_ids_bl: jax.Array, feedback_bl: jax.Array, target_ids_b: jax.Array | None = None,
                  *, dropout_key: jax.Array | None = None) -> jax.Array:
    """The k soft tokens `[b, k, d_llm]` for each user."""
    z_be, h_ble = self.encode_history(history_ids_bl, feedback_bl, target_ids_b, dropout_key=dropout_key)
    if self.config.source == "user":
      soft_bkd = self.projector(z_be)
      if self.config.answer_hint is not None:
        p_b11 = jax.nn.sigmoid(self.config.hint_scale * self.like_logit(z_be))[:, None, None]
        yes_d, no_d = self.llm.embed(jnp.asarray(self.config.answer_hint)).astype(soft_bkd.dtype)
        soft_bkd = soft_bkd.at[:, :1].set(p_b11 * yes_d + (1 - p_b11) * no_d)
      return soft_bkd
    mask_bl = history_ids_bl > 0
    if h_ble.shape[1] > mask_bl.shape[1]:  # the target-aware layout appended the target
      mask_bl = jnp.concatenate([mask_bl, target_ids_b[:, None] > 0], axis=1)
    items_bke = last_states(h_ble, mask_bl, self.config.num_soft_tokens)
    return self.projector(items_bke)[:, :, 0]

  def packed_corr(self) -> jax.Array:
    """`item_corr` over packed ids (id * 4 + feedback): a substitute keeps the user's like or dislike."""
    packed_p = jnp.arange(self.item_corr.shape[0] * FEEDBACK_BITS)
    return self.item_corr[...][packed_p // FEEDBACK_BITS] * FEEDBACK_BITS + (packed_p % FEEDBACK_BITS)[:, None]

  def inputs_embeds(self, tokens_bt: jax.Array, history_ids_bl: jax.Array, feedback_bl: jax.Array,
                    target_ids_b: jax.Array | None = None, *, dropout_key: jax.Array | None = None) -> jax.Array:
    soft_bkd = self.soft_tokens(history_ids_bl, feedback_bl, target_ids_b, dropout_key=dropout_key)
    return place_soft_tokens(self.llm.embed(tokens_bt), tokens_bt, soft_bkd, self.config.placeholder_id)

  def hidden_states(self, tokens_bt, positions_bt=None, attention_mask_bt=None, *, history_ids_bl=None,
                    feedback_bl=None, target_ids_b=None, dropout_key=None, prefix_kv=None, rows_b=None) -> jax.Array:
    """The LLM's final hidden states; soft tokens fill the placeholders when a history is given.
    `prefix_kv` and `rows_b` are as in `Llama.hidden_states` (cached shared prefix; only those positions)."""
    if history_ids_bl is None:
      return self.llm.hidden_states(tokens_bt, positions_bt, attention_mask_bt, dropout_key=dropout_key,
                                    prefix_kv=prefix_kv, rows_b=rows_b)
    if feedback_bl is None:
      feedback_bl = jnp.zeros_like(history_ids_bl)
    enc_key, llm_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    enc_key = enc_key if self.config.prompt_dropout else None
    x_btd = self.inputs_embeds(tokens_bt, history_ids_bl, feedback_bl, target_ids_b, dropout_key=enc_key)
    return self.llm.hidden_states(None, positions_bt, attention_mask_bt, inputs_embeds_btd=x_btd,
                                  dropout_key=llm_key, prefix_kv=prefix_kv, rows_b=rows_b)

  def prefix_cache(self, prefix_tokens_p: jax.Array):
    """`Llama.prefix_cache` of the LLM; a residual model also needs the prefix through the base (LoRA off)."""
    if self.residual:
      return {"lora": self.llm.prefix_cache(prefix_tokens_p), "base": lora_off(self.llm).prefix_cache(prefix_tokens_p)}
    return self.llm.prefix_cache(prefix_tokens_p)

  def residual_logit(self, tokens_bt, positions_bt=None, attention_mask_bt=None, *, history_ids_bl, feedback_bl,
                     target_ids_b, rows_b, dropout_key=None, prefix_kv=None, base_logit_b=None) -> jax.Array:
    """The residual answer logit `[b]` at `rows_b`: g_enc x the encoder's like-logit + g_llm x (Yes-minus-No logit
    of the LLM with LoRA - the same of the base with LoRA off), both passes on the same input embeddings (soft
    tokens where the prompt has placeholders); gates 1 without `residual_gate`. The encoder's logit has no dropout
    (it is the pretrained score the model starts from); the base pass has none either (it is fixed).

    `base_logit_b`: the base pass's logits computed before (`base_answer_logit`; text-only prompts, whose base
    pass nothing trained can change), so only the LoRA pass runs, on the token embeddings (no slot to fill)."""
    enc_b = self.like_logit(self.encode_history(history_ids_bl, feedback_bl, target_ids_b)[0]).astype(jnp.float32)
    enc_key, llm_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    if base_logit_b is None:
      x_btd = self.inputs_embeds(tokens_bt, history_ids_bl, feedback_bl, target_ids_b,
                                 dropout_key=enc_key if self.config.prompt_dropout else None)
    else:  # data/fused.py gives base logits to text-only prompts only
      x_btd = self.llm.embed(tokens_bt)
    lora_kv, base_kv = (None, None) if prefix_kv is None else (prefix_kv["lora"], prefix_kv["base"])
    read = dict(positions_bt=positions_bt, attention_mask_bt=attention_mask_bt, rows_b=rows_b)
    lora_b = yes_minus_no(self.llm, self.config.yes_no, x_btd, dropout_key=llm_key, prefix_kv=lora_kv, **read)
    if base_logit_b is None:
      base_logit_b = yes_minus_no(lora_off(self.llm), self.config.yes_no, x_btd, prefix_kv=base_kv, **read)
    llm_b = lora_b - base_logit_b.astype(jnp.float32)
    if self.residual_gates is None:
      return enc_b + llm_b
    g_2 = self.residual_gates[...]
    return g_2[0] * enc_b + g_2[1] * llm_b

  def base_answer_logit(self, tokens_bt, positions_bt=None, attention_mask_bt=None, *, rows_b,
                        prefix_kv=None) -> jax.Array:
    """The Yes-minus-No logit `[b]` at `rows_b` of the frozen base (LoRA off) on a text-only prompt (no soft tokens):
    what `residual_logit` subtracts, fixed for a prompt while LoRA trains, so it is computed once per prompt set and
    passed back as `base_logit_b`. `prefix_kv` is `prefix_cache`'s."""
    return yes_minus_no(lora_off(self.llm), self.config.yes_no, self.llm.embed(tokens_bt), positions_bt=positions_bt,
                        attention_mask_bt=attention_mask_bt, rows_b=rows_b,
                        prefix_kv=None if prefix_kv is None else prefix_kv["base"])

  def lm_logits(self, h_xd: jax.Array) -> jax.Array:
    return self.llm.lm_logits(h_xd)

  def token_nll(self, h_nd: jax.Array, targets_n: jax.Array) -> jax.Array:
    return self.llm.token_nll(h_nd, targets_n)

  def __call__(self, tokens_bt, positions_bt=None, attention_mask_bt=None, *, history_ids_bl=None,
               feedback_bl=None, target_ids_b=None, dropout_key=None) -> jax.Array:
    h_btd = self.hidden_states(tokens_bt, positions_bt, attention_mask_bt, history_ids_bl=history_ids_bl,
                               feedback_bl=feedback_bl, target_ids_b=target_ids_b, dropout_key=dropout_key)
    return self.llm.lm_logits(h_btd)

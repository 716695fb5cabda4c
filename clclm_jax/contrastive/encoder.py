"""SASRec-style self-attention encoder over item-id sequences (CL4SRec / CoSeRec backbone).

Item and learned position embeddings, post-LayerNorm causal Transformer blocks, dropout only when
a `dropout_key` is passed. Positions count back from each sequence's most recent item, so left and
right padding (and any padded width) give the same hidden states at real positions. Padding never
attends and is never attended; its hidden states are zero.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from clclm_jax.model.llama import Frozen

_init = nnx.initializers.normal(0.02)
NUM_FEEDBACK = 3  # 0 unknown / padding, 1 liked, 2 disliked


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity without a key."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _named(init, names: tuple[str | None, ...]):
  """An initializer whose variable carries logical axis names (mapped to the mesh by `train/sharding.py`)."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def named_linear(d_in: int, d_out: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
                 kernel_init=_init) -> nnx.Linear:
  """`nnx.Linear` whose kernel and bias carry logical axis names (mapped to the mesh by `train/sharding.py`)."""
  return nnx.Linear(d_in, d_out, kernel_init=_named(kernel_init, names),
                    bias_init=_named(nnx.initializers.zeros_init(), names[1:]), rngs=rngs)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs, names: tuple[str | None, str | None]) -> nnx.Linear:
  return named_linear(d_in, d_out, names, rngs=rngs)


def _layernorm(hidden: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(hidden, epsilon=1e-12, scale_init=_named(nnx.initializers.ones_init(), ("enc_embed",)),
                       bias_init=_named(nnx.initializers.zeros_init(), ("enc_embed",)), rngs=rngs)


def _param(cls, value: jax.Array, names: tuple[str | None, ...]):
  return cls(value, out_sharding=names, eager_sharding=False)


class SelfAttention(nnx.Module):
  """Multi-head attention restricted by a boolean [B, L, L] `allowed` mask."""

  def __init__(self, hidden: int, num_heads: int, attn_dropout: float, *, rngs: nnx.Rngs):
    self.num_heads, self.attn_dropout = num_heads, attn_dropout
    heads, out = ("enc_embed", "enc_heads"), ("enc_heads", "enc_embed")
    self.q_proj, self.k_proj = _linear(hidden, hidden, rngs, heads), _linear(hidden, hidden, rngs, heads)
    self.v_proj, self.o_proj = _linear(hidden, hidden, rngs, heads), _linear(hidden, hidden, rngs, out)

  def __call__(self, x_bld: jax.Array, allowed_bll: jax.Array, key: jax.Array | None) -> jax.Array:
    b, l, d = x_bld.shape
    split = lambda t: t.reshape(b, l, self.num_heads, d // self.num_heads)
    q_blhk, k_blhk, v_blhk = split(self.q_proj(x_bld)), split(self.k_proj(x_bld)), split(self.v_proj(x_bld))
    scores_bhqk = jnp.einsum("bqhk,bthk->bhqt", q_blhk, k_blhk) / jnp.sqrt(d // self.num_heads)
    scores_bhqk = jnp.where(allowed_bll[:, None], scores_bhqk, -1e9)
    probs_bhqk = dropout(jax.nn.softmax(scores_bhqk, axis=-1), self.attn_dropout, key)
    out_blhk = jnp.einsum("bhqt,bthk->bqhk", probs_bhqk, v_blhk)
    return self.o_proj(out_blhk.reshape(b, l, d))


class Block(nnx.Module):
  """Post-LN Transformer block: LN(x + attn(x)), then LN(x + mlp(x))."""

  def __init__(self, hidden: int, num_heads: int, dropout_rate: float, attn_dropout: float, *, rngs: nnx.Rngs):
    self.dropout_rate = dropout_rate
    self.self_attn = SelfAttention(hidden, num_heads, attn_dropout, rngs=rngs)
    self.attention_layernorm = _layernorm(hidden, rngs)
    self.up_proj = _linear(hidden, 4 * hidden, rngs, ("enc_embed", "enc_mlp"))
    self.down_proj = _linear(4 * hidden, hidden, rngs, ("enc_mlp", "enc_embed"))
    self.mlp_layernorm = _layernorm(hidden, rngs)

  def __call__(self, x_bld: jax.Array, allowed_bll: jax.Array, key: jax.Array | None) -> jax.Array:
    keys = jax.random.split(key, 3) if key is not None else (None,) * 3
    x_bld = self.attention_layernorm(x_bld + dropout(self.self_attn(x_bld, allowed_bll, keys[0]), self.dropout_rate, keys[1]))
    mlp_bld = self.down_proj(jax.nn.gelu(self.up_proj(x_bld), approximate=False))
    return self.mlp_layernorm(x_bld + dropout(mlp_bld, self.dropout_rate, keys[2]))


class SeqEncoder(nnx.Module):
  """Item-id sequences [B, L] (0 = padding) -> hidden states [B, L, hidden].

  `item_init` [vocab_size, E] initialises the item table (e.g. LLM text embeddings of titles);
  with `freeze_item_init` it stays fixed (a `Frozen` variable) and a learned `item_proj` maps it
  to `hidden` when E differs. The same table scores items at the output (tied weights).
  """

  def __init__(self, vocab_size: int, *, hidden: int = 64, num_layers: int = 2, num_heads: int = 2,
               max_len: int = 50, dropout: float = 0.5, attn_dropout: float = 0.5,
               item_init: jax.Array | None = None, freeze_item_init: bool = False,
               use_feedback: bool = False, rngs: nnx.Rngs):
    if hidden % num_heads:
      raise ValueError(f"hidden {hidden} must be divisible by num_heads {num_heads}")
    self.max_len, self.dropout_rate = max_len, dropout
    if item_init is None:
      self.embed_items = _param(nnx.Param, _init(rngs.params(), (vocab_size, hidden)), ("items", "enc_embed"))
      self.item_proj = None
    else:
      if item_init.shape[0] != vocab_size:
        raise ValueError(f"item_init has {item_init.shape[0]} rows, expected vocab_size {vocab_size} (pad, items, mask)")
      self.embed_items = _param(Frozen if freeze_item_init else nnx.Param, jnp.asarray(item_init, jnp.float32),
                                ("items", None))
      self.item_proj = (_linear(item_init.shape[1], hidden, rngs, (None, "enc_embed"))
                        if item_init.shape[1] != hidden else None)
    self.embed_positions = _param(nnx.Param, _init(rngs.params(), (max_len, hidden)), (None, "enc_embed"))
    self.embed_feedback = (_param(nnx.Param, _init(rngs.params(), (NUM_FEEDBACK, hidden)), (None, "enc_embed"))
                           if use_feedback else None)
    self.embed_layernorm = _layernorm(hidden, rngs)
    self.layers = nnx.List([Block(hidden, num_heads, dropout, attn_dropout, rngs=rngs) for _ in range(num_layers)])

  def item_table(self) -> jax.Array:
    """Item embeddings in the hidden space [vocab_size, hidden] (inputs and output scores)."""
    table_vd = self.embed_items[...]
    return self.item_proj(table_vd) if self.item_proj is not None else table_vd

  def __call__(self, items_bl: jax.Array, *, feedback_bl: jax.Array | None = None,
               dropout_key: jax.Array | None = None) -> jax.Array:
    mask_bl = items_bl > 0
    # Distance from the most recent real item: 0 for the last one, whatever the padding side.
    back_bl = jnp.flip(jnp.cumsum(jnp.flip(mask_bl, 1), axis=1), 1) - 1
    x_bld = self.item_table()[items_bl] + self.embed_positions[...][jnp.clip(back_bl, 0, self.max_len - 1)]
    if feedback_bl is not None:
      if self.embed_feedback is None:
        raise ValueError("feedback_bl given but the encoder was built with use_feedback=False")
      x_bld = x_bld + self.embed_feedback[...][feedback_bl]
    keys = jax.random.split(dropout_key, len(self.layers) + 1) if dropout_key is not None else [None] * (len(self.layers) + 1)
    x_bld = dropout(self.embed_layernorm(x_bld), self.dropout_rate, keys[0]) * mask_bl[..., None]
    l = items_bl.shape[1]
    causal_ll = jnp.tril(jnp.ones((l, l), bool))
    allowed_bll = causal_ll[None] & mask_bl[:, None, :] & mask_bl[:, :, None]
    for layer, key in zip(self.layers, keys[1:]):
      x_bld = layer(x_bld, allowed_bll, key) * mask_bl[..., None]
    return x_bld

  def encode(self, items_bl: jax.Array, *, pooling: str = "last", **kwargs) -> jax.Array:
    """Pooled user representations [B, hidden]."""
    return pool(self(items_bl, **kwargs), items_bl > 0, pooling)


def pool(h_bld: jax.Array, mask_bl: jax.Array, how: str = "last") -> jax.Array:
  """The hidden state at the last real position ('last', CL4SRec) or the mean over real ones."""
  if how == "last":
    last_b = jnp.argmax(jnp.where(mask_bl, jnp.arange(mask_bl.shape[1]), -1), axis=1)
    return jnp.take_along_axis(h_bld, last_b[:, None, None], axis=1)[:, 0]
  if how == "mean":
    return (h_bld * mask_bl[..., None]).sum(1) / jnp.maximum(mask_bl.sum(1, keepdims=True), 1)
  raise ValueError(f"pooling must be 'last' or 'mean', got {how!r}")

"""LLaMA decoder in Flax NNX with Hugging Face module names, frozen (optionally int8) base and LoRA."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clclm_jax.model.config import LORA_TARGETS, LlamaConfig, LoraConfig
from clclm_jax.model.errors import ModelError
from clclm_jax.model.quant import dequantize, quantize_int8


class Frozen(nnx.Variable):
  """A frozen float base weight (not an `nnx.Param`, so optimisers skip it)."""


class QInt8(nnx.Variable):
  """A frozen int8 kernel `[in, out]`."""


class QScale(nnx.Variable):
  """Float32 group scale or zero point `[in // 32, out]` of a `QInt8` kernel."""


def variable(cls, value, names: tuple[str, ...]):
  """A variable tagged with logical axis names; meshes are applied later by `train/sharding.py`."""
  return cls(value, out_sharding=names, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape, std: float = 0.02) -> jax.Array:
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def frozen_matmul(x: jax.Array, w_io: jax.Array) -> jax.Array:
  """`x @ W` accumulated in float32 for a frozen `W` (no dW). Below float32, the backward is one dot in
  `W`'s dtype (`_low_precision_matmul`); in float32, autodiff's own, which keeps the int8 dequantisation
  fused into each dot instead of saving the float weight (7.3 s against 6.8 s per SmolLM2 4x256 step)."""
  if w_io.dtype == jnp.float32:
    return jnp.matmul(x.astype(jnp.float32), w_io, preferred_element_type=jnp.float32)
  return _low_precision_matmul(x.astype(w_io.dtype), w_io)


@jax.custom_vjp
def _low_precision_matmul(x: jax.Array, w_io: jax.Array) -> jax.Array:
  """Autodiff would run the backward of a bf16 dot with float32 accumulation in float32; on CPU a bf16 x
  bf16 -> f32 dot runs at about twice the float32 speed (5.1 s against 6.0 s per SmolLM2 4x256 step)."""
  return jnp.matmul(x, w_io, preferred_element_type=jnp.float32)


def _low_precision_fwd(x, w_io):
  return _low_precision_matmul(x, w_io), w_io


def _low_precision_bwd(w_io, ct):
  dx = jnp.einsum("...o,io->...i", ct.astype(w_io.dtype), w_io, preferred_element_type=jnp.float32)
  return dx.astype(w_io.dtype), None


_low_precision_matmul.defvjp(_low_precision_fwd, _low_precision_bwd)


def dropout(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
  """Inverted dropout with a mask from 16-bit halves of 32-bit draws: half the draws of `jax.random.bernoulli`
  and no float uniforms (2.0 against 5.0 ms a [4, 256, 576] mask on CPU); the rate is rounded to k / 2**16."""
  d = x.shape[-1]
  bits = jax.random.bits(key, (*x.shape[:-1], (d + 1) // 2), jnp.uint32)
  halves = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[..., :d]
  threshold = round(rate * 65536)
  keep = halves >= threshold
  return jnp.where(keep, x * (65536 / (65536 - threshold)), 0).astype(x.dtype)


class Linear(nnx.Module):
  """Projection `x @ W (+ b)` with a frozen float or int8 `W [in, out]`, an optional frozen float32 bias `b [out]`
  (Qwen2's q, k, v) and optional LoRA.

  With `layers=L` it holds one projection per decoder layer, stacked: every variable has a leading
  `[L, ...]` axis named "layers". `__call__` runs one layer's slice (the scan or the loop in `Llama`
  slices the stacked variables before calling), so its code sees `[in, out]` either way."""

  def __init__(self, in_features: int, out_features: int, names: tuple[str, str], *,
               dtype=jnp.float32, quantize: str | None = None, layers: int | None = None, bias: bool = False,
               rngs: nnx.Rngs):
    self.names = names
    self.dtype = dtype
    self.quantize = quantize
    self.lora_a = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_scaling = 0.0
    self.lora_dropout = 0.0
    lead = () if layers is None else (layers,)
    self.set_kernel(_normal(rngs, (*lead, in_features, out_features)))
    self.bias = nnx.data(None)
    if bias:
      self.bias = variable(Frozen, jnp.zeros((*lead, out_features), jnp.float32), self._names(len(lead) + 1, names[1:]))

  def _names(self, ndim: int, names: tuple) -> tuple:
    """Logical names of a variable of rank `ndim` whose last axes are `names`: leading axes are "layers"."""
    return ("layers",) * (ndim - len(names)) + tuple(names)

  def set_kernel(self, w_io: jax.Array | list[jax.Array]):
    """Stores float weights `[..., in, out]` (or a list of per-layer `[in, out]`, stacked in order),
    quantising them when the layer is int8; a list is quantised one layer at a time, so loading holds
    one float layer besides the stored ones."""
    if isinstance(w_io, (list, tuple)):
      parts = [self._stored(w) for w in w_io]
      stored = [None if p[0] is None else jnp.stack(p) for p in zip(*parts)]
    else:
      stored = self._stored(w_io)
    kernel, scale, zero = stored
    if self.quantize == "int8":
      self.kernel = variable(QInt8, kernel, self._names(kernel.ndim, self.names))
      # The group axis splits like the kernel's input rows (whole groups per device where they divide): under
      # fsdp, replicated float32 scales and zeros would be a quarter of the int8 weights on every device.
      self.scale = variable(QScale, scale, self._names(scale.ndim, self.names))
      self.zero = variable(QScale, zero, self._names(zero.ndim, self.names))
    else:
      self.kernel = variable(Frozen, kernel, self._names(kernel.ndim, self.names))
      self.scale = nnx.data(None)
      self.zero = nnx.data(None)

  def _stored(self, w_io):
    if self.quantize == "int8":
      return quantize_int8(w_io)
    return jnp.asarray(w_io, self.dtype), None, None

  def weight(self, dtype=jnp.float32) -> jax.Array:
    """The float base weight `[..., in, out]`, dequantised on the fly if int8."""
    if self.scale is None:
      return self.kernel[...].astype(dtype)
    return dequantize(self.kernel[...], self.scale[...], self.zero[...], dtype)

  def add_lora(self, cfg: LoraConfig, key: jax.Array):
    """Attaches LoRA: A `[..., in, r]` ~ N(0, 1/in), B `[..., r, out]` = 0, so the model is unchanged
    (one A and B per stacked layer, drawn together from `key`)."""
    *lead, d_in, d_out = self.kernel.shape
    a = jax.random.normal(key, (*lead, d_in, cfg.r), jnp.float32) / jnp.sqrt(d_in)
    self.lora_a = variable(nnx.LoRAParam, a, self._names(a.ndim, (self.names[0], "lora_rank")))
    b = jnp.zeros((*lead, cfg.r, d_out), jnp.float32)
    self.lora_b = variable(nnx.LoRAParam, b, self._names(b.ndim, ("lora_rank", self.names[1])))
    self.lora_scaling = cfg.scaling
    self.lora_dropout = cfg.dropout

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None, out_dtype=None) -> jax.Array:
    out_dtype = out_dtype or self.dtype
    # Accumulating in float32 is also the fast path on CPU: XLA's bf16 x bf16 -> bf16 dot runs at half the
    # speed of bf16 x bf16 -> f32. The LoRA update is added in float32, then one cast.
    y = frozen_matmul(x, self.weight(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...]
    if self.lora_a is not None:
      if dropout_key is not None and self.lora_dropout > 0:
        x = dropout(dropout_key, x, self.lora_dropout)
      h = jnp.matmul(x, self.lora_a[...].astype(self.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
      y = y + jnp.matmul(h, self.lora_b[...].astype(self.dtype), preferred_element_type=jnp.float32) * self.lora_scaling
    return y.astype(out_dtype)


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, computed in float32; `layers=L` stacks L weights `[L, dim]`."""

  def __init__(self, dim: int, eps: float, layers: int | None = None):
    self.eps = eps
    lead = () if layers is None else (layers,)
    self.weight = variable(Frozen, jnp.ones((*lead, dim), jnp.float32), ("layers",) * len(lead) + ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.weight[...]).astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray | None:
  """The inverse frequencies `[head_dim / 2]` of a scaled RoPE (llama3, linear, or llama.cpp's per-frequency
  factors), as Hugging Face computes them (float32 base frequencies); None for plain RoPE."""
  scaling = dict(cfg.rope_scaling)
  kind = scaling.get("rope_type", "default")
  if kind == "default" and not cfg.rope_freq_factors:
    return None
  d = cfg.head_dim
  inv_freq = (1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))).astype(np.float64)
  if cfg.rope_freq_factors:
    inv_freq = inv_freq / np.asarray(cfg.rope_freq_factors, np.float64)
  if kind == "linear":
    inv_freq = inv_freq / scaling["factor"]
  elif kind == "llama3":
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
  return inv_freq.astype(np.float32)


def rope_tables(positions_bt: jax.Array, head_dim: int, theta: float, inv_freq: np.ndarray | None = None):
  """cos/sin `[b, t, head_dim]` for rotate-half rotary embeddings (Hugging Face layout); `inv_freq` (from
  `rope_inv_freq`) replaces the plain frequencies of `theta`."""
  if inv_freq is None:
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def take_rows(x_bt: jax.Array, rows_b: jax.Array) -> jax.Array:
  """`x[i, rows_b[i]]` kept as a length-1 time axis: `[b, t, ...]` -> `[b, 1, ...]`."""
  index = rows_b.reshape(-1, *([1] * (x_bt.ndim - 1)))
  return jnp.take_along_axis(x_bt, index, axis=1)


def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
  x = x_bthd.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  out = x * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
  return out.astype(x_bthd.dtype)


def _masked_scores(q_bkgtd, k_bksd, allowed_bts):
  scores = jnp.einsum("bkgtd,bksd->bkgts", q_bkgtd, k_bksd, preferred_element_type=jnp.float32)
  return jnp.where(allowed_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)


def causal_query_block(t: int, min_block: int = 64, max_blocks: int = 4) -> int | None:
  """Queries per block for `attend` on a causal mask of `t` queries (None: one block). At most
  `max_blocks` blocks skip (n - 1) / 2n of the score and value products; more blocks compile longer."""
  return None if t <= min_block else max(min_block, -(-t // max_blocks))


def _query_blocks(t: int, s: int, block: int | None) -> list[tuple[int, int, int]]:
  """(first query, end query, end key) per block; a block's queries see no key after its last query."""
  if block is None:
    return [(0, t, s)]
  return [(i, min(i + block, t), s - t + min(i + block, t)) for i in range(0, t, block)]


def _concat(xs: list[jax.Array], axis: int) -> jax.Array:
  return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis)


def _pad_keys(x_bksd: jax.Array, s: int) -> jax.Array:
  return jnp.pad(x_bksd, ((0, 0), (0, 0), (0, s - x_bksd.shape[2]), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attend(q_btkgd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, allowed_bts: jax.Array,
           causal_block: int | None = None) -> jax.Array:
  """softmax(q k^T, where allowed) v with float32 scores, for already-scaled grouped queries `[b, t, k, g, d]`.
  Its backward recomputes the probabilities from the saved row max and log-sum, so training keeps no
  `[b, k, g, t, s]` tensor per layer (those were most of a train step's memory at 512 tokens).
  With `causal_block` (the mask must then be causal, the queries being the last t keys), queries run that
  many at a time against the keys up to their last one only: the later keys are masked anyway. Inside,
  heads lead (`[b, k, g, t, d]`), so blocks are contiguous slices (a fifth less time on CPU than time-major)."""
  return _attend_fwd(q_btkgd, k_bskd, v_bskd, allowed_bts, causal_block)[0]


def _probs(scores, max_bkgt, logsum_bkgt):
  """exp(s - max - log sum): the max kept apart, so a row with no allowed key stays uniform."""
  return jnp.exp(scores - max_bkgt[..., None] - logsum_bkgt[..., None])


def _attend_fwd(q_btkgd, k_bskd, v_bskd, allowed_bts, causal_block):
  q, k, v = q_btkgd.transpose(0, 2, 3, 1, 4), k_bskd.transpose(0, 2, 1, 3), v_bskd.transpose(0, 2, 1, 3)
  outs, maxes, logsums = [], [], []
  for i, j, e in _query_blocks(q.shape[3], k.shape[2], causal_block):
    scores = _masked_scores(q[:, :, :, i:j], k[:, :, :e], allowed_bts[:, i:j, :e])
    max_bkgt = jnp.max(scores, axis=-1)
    logsum_bkgt = jnp.log(jnp.sum(jnp.exp(scores - max_bkgt[..., None]), axis=-1))
    probs = _probs(scores, max_bkgt, logsum_bkgt).astype(v.dtype)
    outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, v[:, :, :e], preferred_element_type=jnp.float32))
    maxes.append(max_bkgt)
    logsums.append(logsum_bkgt)
  out_btkgd = _concat(outs, 3).astype(v.dtype).transpose(0, 3, 1, 2, 4)
  return out_btkgd, (q, k, v, allowed_bts, _concat(maxes, -1), _concat(logsums, -1))


def _attend_bwd(causal_block, res, dout_btkgd):
  q_bkgtd, k_bksd, v_bksd, allowed_bts, max_bkgt, logsum_bkgt = res
  s = k_bksd.shape[2]
  dout_bkgtd = dout_btkgd.astype(v_bksd.dtype).transpose(0, 2, 3, 1, 4)
  dqs, dk_bksd, dv_bksd = [], 0.0, 0.0
  for i, j, e in _query_blocks(q_bkgtd.shape[3], s, causal_block):
    q, k, v, dout = q_bkgtd[:, :, :, i:j], k_bksd[:, :, :e], v_bksd[:, :, :e], dout_bkgtd[:, :, :, i:j]
    probs = _probs(_masked_scores(q, k, allowed_bts[:, i:j, :e]), max_bkgt[..., i:j], logsum_bkgt[..., i:j])
    dv = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(v.dtype), dout, preferred_element_type=jnp.float32)
    dprobs = jnp.einsum("bkgtd,bksd->bkgts", dout, v, preferred_element_type=jnp.float32)
    dscores = probs * (dprobs - jnp.sum(probs * dprobs, axis=-1, keepdims=True))
    dscores = jnp.where(allowed_bts[:, i:j, :e][:, None, None], dscores, 0.0).astype(q.dtype)
    dqs.append(jnp.einsum("bkgts,bksd->bkgtd", dscores, k, preferred_element_type=jnp.float32))
    dk = jnp.einsum("bkgts,bkgtd->bksd", dscores, q, preferred_element_type=jnp.float32)
    dk_bksd, dv_bksd = dk_bksd + _pad_keys(dk, s), dv_bksd + _pad_keys(dv, s)
  dq_btkgd = _concat(dqs, 3).astype(q_bkgtd.dtype).transpose(0, 3, 1, 2, 4)
  return (dq_btkgd, dk_bksd.astype(k_bksd.dtype).transpose(0, 2, 1, 3),
          dv_bksd.astype(v_bksd.dtype).transpose(0, 2, 1, 3), None)


attend.defvjp(_attend_fwd, _attend_bwd)


ATTENTION_IMPLS = ("custom", "xla", "cudnn")


def attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, allowed_bts: jax.Array,
              impl: str = "custom", causal: bool = True) -> jax.Array:
  """Grouped-query softmax attention `[b, t, heads, d]` of unscaled queries over `[b, s, kv_heads, d]` keys
  where `allowed_bts` (padding, causality, segments and prefix keys in one mask), the softmax in float32.

  `impl`: "custom" is `attend` (custom VJP saving row statistics, not probabilities; causal query blocks
  when `causal`, i.e. the queries are the last t keys under a causal mask); "xla" and "cudnn" are
  `jax.nn.dot_product_attention` with that implementation (cuDNN: GPU, 16-bit inputs only)."""
  b, t, h, d = q_bthd.shape
  k_heads = k_bskd.shape[2]
  if impl == "custom":
    q_btkgd = q_bthd.reshape(b, t, k_heads, h // k_heads, d) * d**-0.5
    out_btkgd = attend(q_btkgd, k_bskd, v_bskd, allowed_bts, causal_query_block(t) if causal else None)
    return out_btkgd.reshape(b, t, h, d)
  if impl not in ATTENTION_IMPLS:
    raise ModelError(f"attention_impl={impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
  return jax.nn.dot_product_attention(q_bthd, k_bskd.astype(q_bthd.dtype), v_bskd.astype(q_bthd.dtype),
                                      mask=allowed_bts[:, None], scale=d**-0.5, implementation=impl)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with float32 softmax."""

  def __init__(self, cfg: LlamaConfig, *, dtype, quantize, layers=None, rngs: nnx.Rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (
        cfg.num_attention_heads, cfg.num_key_value_heads, hd)
    kw = dict(dtype=dtype, quantize=quantize, layers=layers, rngs=rngs)
    bias = lambda name: name in cfg.bias_projections  # noqa: E731
    self.q_proj = Linear(d, self.num_heads * hd, ("embed", "heads"), bias=bias("q_proj"), **kw)
    self.k_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=bias("k_proj"), **kw)
    self.v_proj = Linear(d, self.num_kv_heads * hd, ("embed", "kv_heads"), bias=bias("v_proj"), **kw)
    self.o_proj = Linear(self.num_heads * hd, d, ("heads", "embed"), bias=bias("o_proj"), **kw)
    # Qwen3: RMSNorm over each head's queries and keys (one weight [head_dim] per layer), before RoPE.
    self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, layers) if cfg.qk_norm else nnx.data(None)
    self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, layers) if cfg.qk_norm else nnx.data(None)

  def __call__(self, x_btd, cos_btd, sin_btd, allowed_bts, keys, prefix_kv=None, rows_b=None, impl="custom",
               cache_index=None):
    """Returns (output, (k, v)); `prefix_kv` = roped (k, v) `[1, p, kv_heads, d]` attended before x.
    With `cache_index`, `prefix_kv` is instead this layer's key/value cache `[b, s, kv_heads, d]`: x's k and v
    are written at slots `cache_index ..` of a copy and the queries attend to all s slots (where allowed).
    With `rows_b`, only the query at position `rows_b[i]` of row i runs: the output is `[b, 1, d]`.
    `impl` picks the attention kernel (`attention`)."""
    b, t, _ = x_btd.shape
    k_heads = self.num_kv_heads
    xq_btd, cos_q, sin_q = x_btd, cos_btd, sin_btd
    if rows_b is not None:
      xq_btd, cos_q, sin_q, allowed_bts = (take_rows(a, rows_b) for a in (x_btd, cos_btd, sin_btd, allowed_bts))
    tq = xq_btd.shape[1]
    q_bthd = self.q_proj(xq_btd, keys[0]).reshape(b, tq, self.num_heads, self.head_dim)
    k_btkd = self.k_proj(x_btd, keys[1]).reshape(b, t, k_heads, self.head_dim)
    v_btkd = self.v_proj(x_btd, keys[2]).reshape(b, t, k_heads, self.head_dim)
    if self.q_norm is not None:
      q_bthd, k_btkd = self.q_norm(q_bthd), self.k_norm(k_btkd)
    q_bthd = apply_rope(q_bthd, cos_q, sin_q)
    k_btkd = apply_rope(k_btkd, cos_btd, sin_btd)
    kv = (k_btkd, v_btkd)
    if cache_index is not None:
      k_btkd, v_btkd = (jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), cache_index, axis=1)
                        for c, x in zip(prefix_kv, kv))
    elif prefix_kv is not None:
      k_btkd, v_btkd = (jnp.concatenate([jnp.broadcast_to(p, (b, *p.shape[1:])).astype(x.dtype), x], axis=1)
                        for p, x in zip(prefix_kv, kv))
    # Causal query blocks assume the queries are the last t keys: not so in a cache.
    causal = rows_b is None and cache_index is None
    out_bthd = attention(q_bthd, k_btkd, v_btkd, allowed_bts, impl, causal=causal)
    return self.o_proj(out_bthd.reshape(b, tq, -1), keys[3]), kv


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def swiglu(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
  """silu(gate) * up cast to `dtype`; the backward keeps only gate and up (autodiff kept five tensors of
  this size per layer, the largest part of a train step's saved activations)."""
  return (jax.nn.silu(gate) * up).astype(dtype)


def _swiglu_fwd(gate, up, dtype):
  return swiglu(gate, up, dtype), (gate, up)


def _swiglu_bwd(dtype, res, dout):
  del dtype
  gate, up = res
  sig = jax.nn.sigmoid(gate)
  dout = dout.astype(gate.dtype)
  return dout * up * sig * (1 + gate * (1 - sig)), dout * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, *, dtype, quantize, layers=None, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(dtype=dtype, quantize=quantize, layers=layers, rngs=rngs)
    bias = lambda name: name in cfg.bias_projections  # noqa: E731
    self.gate_proj = Linear(d, f, ("embed", "mlp"), bias=bias("gate_proj"), **kw)
    self.up_proj = Linear(d, f, ("embed", "mlp"), bias=bias("up_proj"), **kw)
    self.down_proj = Linear(f, d, ("mlp", "embed"), bias=bias("down_proj"), **kw)

  def __call__(self, x_btd, keys):
    """gate and up stay float32 into one fused silu-multiply-cast (13% faster than bf16 outputs on CPU)."""
    gate, up = (p(x_btd, k, out_dtype=jnp.float32) for p, k in ((self.gate_proj, keys[0]), (self.up_proj, keys[1])))
    return self.down_proj(swiglu(gate, up, x_btd.dtype), keys[2])


class DecoderLayer(nnx.Module):
  """Pre-norm attention block then pre-norm MLP block, each with a residual.

  With `layers=L` every variable is stacked `[L, ...]` (one module holds all decoder layers); `Llama`
  calls it on one layer's slice of them at a time."""

  def __init__(self, cfg: LlamaConfig, *, dtype, quantize, layers: int | None = None, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, layers)
    self.self_attn = Attention(cfg, dtype=dtype, quantize=quantize, layers=layers, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, layers)
    self.mlp = MLP(cfg, dtype=dtype, quantize=quantize, layers=layers, rngs=rngs)

  def __call__(self, x_btd, cos_btd, sin_btd, allowed_bts, dropout_key=None, prefix_kv=None, rows_b=None,
               attention_impl="custom", cache_index=None):
    """Returns (output, this layer's roped (k, v) of x); with `rows_b` the output is those rows `[b, 1, d]`.
    With `cache_index`, `prefix_kv` is this layer's key/value cache (`Attention`)."""
    keys = [None] * 7 if dropout_key is None else list(jax.random.split(dropout_key, 7))
    attn_btd, kv = self.self_attn(self.input_layernorm(x_btd), cos_btd, sin_btd, allowed_bts, keys[:4],
                                  prefix_kv, rows_b, attention_impl, cache_index)
    x_btd = (x_btd if rows_b is None else take_rows(x_btd, rows_b)) + attn_btd
    return x_btd + self.mlp(self.post_attention_layernorm(x_btd), keys[4:]), kv


class Embed(nnx.Module):
  """Token embedding table `[vocab, embed]`, kept in the compute dtype."""

  def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.embedding = variable(Frozen, _normal(rngs, (vocab, dim)).astype(dtype), ("vocab", "embed"))

  def __call__(self, tokens_bt: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens_bt, axis=0)


def mask_and_positions(attention_mask_bt: jax.Array):
  """Causal same-segment mask `[b, t, s]` and per-segment positions from 0/1 or segment ids."""
  seg_bt = attention_mask_bt.astype(jnp.int32)
  t = seg_bt.shape[1]
  causal_ts = jnp.tril(jnp.ones((t, t), bool))
  allowed_bts = (seg_bt[:, :, None] == seg_bt[:, None, :]) & (seg_bt[:, None, :] > 0) & causal_ts
  positions_bt = jnp.maximum(allowed_bts.sum(-1) - 1, 0)
  return allowed_bts, positions_bt


def window_mask(t: int, s: int, window: int | None, first_query=None) -> jax.Array | None:
  """`[t, s]`: query i (key slot `first_query + i`, default s - t: the queries are the last t keys) may see key
  slot j when it lies fewer than `window` slots back, as Hugging Face's sliding window counts (slots, not
  positions: a row's real tokens are contiguous slots under left padding, packing and a KV cache alike).
  None when no query can reach that far back (no window, or s <= window)."""
  if window is None or s <= window:
    return None
  q_t = (s - t if first_query is None else first_query) + jnp.arange(t)
  return (q_t[:, None] - jnp.arange(s)[None, :]) < window


def _chunked_nll(h_nd, w_dv, targets_n, chunk: int, with_grad: bool):
  """Cross-entropy of `h @ w` per row, `chunk` rows at a time; with `with_grad`, also its gradient in h."""
  n, d = h_nd.shape
  chunk = min(chunk, n)
  pad = -n % chunk
  h_cnd = jnp.pad(h_nd, ((0, pad), (0, 0))).reshape(-1, chunk, d)
  t_cn = jnp.pad(targets_n, (0, pad)).reshape(-1, chunk)

  def one(xs):
    h, t = xs
    logits_nv = frozen_matmul(h.astype(w_dv.dtype), w_dv)
    lse_n = jax.nn.logsumexp(logits_nv, axis=-1)
    nll_n = lse_n - jnp.take_along_axis(logits_nv, t[:, None], axis=-1)[:, 0]
    if not with_grad:
      return nll_n, None
    dlogits_nv = jnp.exp(logits_nv - lse_n[:, None]) - jax.nn.one_hot(t, w_dv.shape[1], dtype=jnp.float32)
    dh_nd = jnp.einsum("nv,dv->nd", dlogits_nv.astype(w_dv.dtype), w_dv, preferred_element_type=jnp.float32)
    return nll_n, dh_nd.astype(h_nd.dtype)

  if h_cnd.shape[0] == 1:  # one chunk: no loop
    nll_cn, dh_cnd = jax.tree.map(lambda x: x[None], one((h_cnd[0], t_cn[0])))
  else:
    nll_cn, dh_cnd = jax.lax.map(one, (h_cnd, t_cn))
  return nll_cn.reshape(-1)[:n], None if dh_cnd is None else dh_cnd.reshape(-1, d)[:n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def linear_cross_entropy(h_nd: jax.Array, w_dv: jax.Array, targets_n: jax.Array, chunk: int) -> jax.Array:
  """-log softmax(h @ w)[target] per row for a frozen head `w [d, vocab]`, in float32. The forward pass
  computes the gradient in h chunk by chunk, so neither pass keeps `[n, vocab]` logits (at 8 x 512
  SmolLM2 tokens those were four 0.8 GB arrays); `w` gets no gradient."""
  return _chunked_nll(h_nd, w_dv, targets_n, chunk, with_grad=False)[0]


def _linear_ce_fwd(h_nd, w_dv, targets_n, chunk):
  return _chunked_nll(h_nd, w_dv, targets_n, chunk, with_grad=True)  # (nll, its gradient in h as residual)


def _linear_ce_bwd(chunk, dh_nd, g_n):
  del chunk
  return (g_n[:, None] * dh_nd).astype(dh_nd.dtype), None, None


linear_cross_entropy.defvjp(_linear_ce_fwd, _linear_ce_bwd)


REMAT_POLICIES = {
    "": None,  # no remat: the backward pass keeps every layer's activations
    "full": jax.checkpoint_policies.nothing_saveable,  # keep each layer's input only, recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # also keep the projections' outputs
}


def remat_policy_name(remat: bool | str | None) -> str:
  """`Llama.remat` as a `REMAT_POLICIES` key: False / None / "" / "none" -> "", True -> "full"."""
  if remat is True:
    return "full"
  if remat in (False, None, "none"):
    return ""
  if remat not in REMAT_POLICIES:
    raise ModelError(f"remat={remat!r} is not one of True, False, {', '.join(repr(k) for k in REMAT_POLICIES)}")
  return remat


class KVCache(NamedTuple):
  """Key/value cache for `Llama.decode` (a pytree): roped keys and values of every layer in preallocated
  slots, and which slots hold real tokens (0 for left padding and for slots not written yet)."""

  k_lbskd: jax.Array  # [num_layers, b, max_len, kv_heads, head_dim], compute dtype
  v_lbskd: jax.Array
  valid_bs: jax.Array  # [b, max_len] bool


def _layer_slice(tree, i):
  """Layer `i` (an int or a slice) of stacked variables / keys / prefix kv; None stays None."""
  return jax.tree.map(lambda x: x[i], tree)


class Llama(nnx.Module):
  """LLaMA causal LM; `dtype` is the compute dtype, `quantize="int8"` stores projections as int8.

  The decoder layers are one `DecoderLayer` with stacked `[num_layers, ...]` variables (`model.layers`;
  Hugging Face's `model.layers.{i}.<name>` is slice i). `scan_layers=True` runs them under `jax.lax.scan`:
  one layer is compiled, however deep the model; `False` runs the same weights in a Python loop (each
  layer compiled separately; the same numbers, for tests and comparisons).
  `remat` (gradient checkpointing of each layer, the scanned body under scan): False/"" (none), True or
  "full" (keep only each layer's input: a third more forward work for activations of one layer instead of
  all), "dots" (also keep the matmul outputs that have no batch dimensions, i.e. the projections; recompute
  attention and the elementwise work). `attention_impl`: see `attention` ("custom" default on CPU)."""

  def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, quantize: str | None = None,
               remat: bool | str = False, scan_layers: bool = True, attention_impl: str = "custom",
               rngs: nnx.Rngs):
    self.config = cfg
    self.lora_config: LoraConfig | None = None
    self.dtype = jnp.dtype(dtype)
    remat_policy_name(remat)  # validates
    self.remat = remat
    self.scan_layers = scan_layers
    self.attention_impl = attention_impl
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
    self.layers = DecoderLayer(cfg, dtype=dtype, quantize=quantize, layers=cfg.num_hidden_layers, rngs=rngs)
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    self.lm_head = nnx.data(None)
    if not cfg.tie_word_embeddings:
      self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), dtype=dtype,
                            quantize=quantize, rngs=rngs)

  def projections(self, targets=LORA_TARGETS) -> list[tuple[str, "Linear"]]:
    """`(hf_path, Linear)` for the named projections, one stacked `Linear` (weights `[num_layers, ...]`) per
    name, e.g. `("layers.{i}.self_attn.q_proj", lin)`: `hf_path.format(i=i)` names slice i of its weights."""
    out = []
    for name in LORA_TARGETS:
      block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
      if name in targets:
        out.append((f"layers.{{i}}.{block}.{name}", getattr(getattr(self.layers, block), name)))
    return out

  def embed(self, tokens_bt: jax.Array) -> jax.Array:
    return self.embed_tokens(tokens_bt)

  def hidden_states(self, tokens_bt=None, positions_bt=None, attention_mask_bt=None, *,
                    inputs_embeds_btd=None, dropout_key=None, prefix_kv=None, rows_b=None) -> jax.Array:
    """Final-normed hidden states `[b, t, d]` in the compute dtype.

    `prefix_kv` (from `prefix_cache`) is a shared prompt prefix every row continues: rows then hold
    only the rest of their tokens, and default positions start after the prefix. With `rows_b`, only
    position `rows_b[i]` of row i is returned (`[b, d]`), and the last layer runs no other query.
    """
    return self._forward(tokens_bt, positions_bt, attention_mask_bt, inputs_embeds_btd, dropout_key,
                         prefix_kv, rows_b)[0]

  def prefix_cache(self, prefix_tokens_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Roped (k, v) of a token prefix for every layer, stacked `[num_layers, 1, p, kv_heads, head_dim]`,
    for `hidden_states(..., prefix_kv=)` (callers treat it as opaque)."""
    return self._forward(prefix_tokens_p[None], None, None, None, None, None)[1]

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty `KVCache` of `max_len` slots per row, `[num_layers, batch, max_len, kv_heads, head_dim]`."""
    cfg = self.config
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.zeros((batch, max_len), bool))

  def decode(self, tokens_bt: jax.Array, cache: KVCache, index, attention_mask_bt=None, *, positions_bt=None,
             last_only: bool = False, inputs_embeds_btd=None) -> tuple[jax.Array, KVCache]:
    """Runs `tokens_bt` as cache slots `index .. index + t - 1` (`index` a scalar, traced or not, the same for
    every row): each query attends to the valid slots up to its own; their roped k/v and validity
    (`attention_mask_bt`, default all real) are written into the cache. Prefill is a call at index 0 with
    left-padded prompts; each decode step a call with `t = 1`. Positions default to the number of valid slots
    before each token. Returns (final-normed hidden states `[b, t, d]`, or `[b, d]` of the last token with
    `last_only`, whose last layer then runs that query only; the updated cache). `inputs_embeds_btd` replaces the
    tokens' embeddings (soft tokens in a prompt), as in `hidden_states`."""
    b, t = tokens_bt.shape
    s = cache.valid_bs.shape[1]
    mask_bt = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
    valid_bs = jax.lax.dynamic_update_slice_in_dim(cache.valid_bs, mask_bt, index, axis=1)
    if positions_bt is None:
      before_b = jnp.sum(cache.valid_bs & (jnp.arange(s) < index), axis=1)
      positions_bt = jnp.maximum(before_b[:, None] + jnp.cumsum(mask_bt, axis=1) - 1, 0)
    slots_ts = (jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None])
    allowed_bts = valid_bs[:, None, :] & slots_ts[None]
    cos_btd, sin_btd = self.rope(positions_bt)
    x_btd = (self.embed(tokens_bt) if inputs_embeds_btd is None else inputs_embeds_btd).astype(self.dtype)
    rows_b = jnp.full((b,), t - 1) if last_only else None
    window_ts = window_mask(t, s, self.config.sliding_window, first_query=index)
    x_btd, (k_lbtkd, v_lbtkd) = self._decoder(x_btd, cos_btd, sin_btd, allowed_bts, None,
                                              (cache.k_lbskd, cache.v_lbskd), rows_b, index, window_ts)
    k_lbskd, v_lbskd = (jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), index, axis=2)
                        for c, x in ((cache.k_lbskd, k_lbtkd), (cache.v_lbskd, v_lbtkd)))
    return self.norm(x_btd if rows_b is None else x_btd[:, 0]), KVCache(k_lbskd, v_lbskd, valid_bs)

  def _forward(self, tokens_bt, positions_bt, attention_mask_bt, inputs_embeds_btd, dropout_key, prefix_kv,
               rows_b=None):
    x_btd = self.embed(tokens_bt) if inputs_embeds_btd is None else inputs_embeds_btd
    x_btd = x_btd.astype(self.dtype)
    b, t = x_btd.shape[:2]
    if attention_mask_bt is None:
      attention_mask_bt = jnp.ones((b, t), jnp.int32)
    allowed_bts, default_positions_bt = mask_and_positions(attention_mask_bt)
    if prefix_kv is not None:
      p = prefix_kv[0].shape[2]
      allowed_bts = jnp.concatenate([jnp.ones((b, t, p), bool), allowed_bts], axis=-1)
      default_positions_bt = default_positions_bt + p
    positions_bt = default_positions_bt if positions_bt is None else positions_bt
    cos_btd, sin_btd = self.rope(positions_bt)
    window_ts = window_mask(t, allowed_bts.shape[-1], self.config.sliding_window)
    x_btd, kv = self._decoder(x_btd, cos_btd, sin_btd, allowed_bts, dropout_key, prefix_kv, rows_b,
                              window_ts=window_ts)
    return self.norm(x_btd if rows_b is None else x_btd[:, 0]), kv

  def rope(self, positions_bt: jax.Array):
    """cos/sin tables of this model's RoPE (scaled as its config says) at `positions_bt`."""
    cfg = self.config
    return rope_tables(positions_bt, cfg.head_dim, cfg.rope_theta, rope_inv_freq(cfg))

  def _decoder(self, x_btd, cos_btd, sin_btd, allowed_bts, dropout_key, prefix_kv, rows_b, cache_index=None,
               window_ts=None):
    """All decoder layers; returns (output, stacked (k, v) `[L, b, t, kv_heads, head_dim]`). Layer i gets
    dropout key fold_in(dropout_key, i), under scan and in the loop alike. With `cache_index`, `prefix_kv`
    is a stacked key/value cache (`decode`). `window_ts` (`window_mask`) further limits the sliding-window
    layers: all of them share one mask; when only some layers slide, each picks its mask by a per-layer flag."""
    n = self.config.num_hidden_layers
    graphdef, stacked = nnx.split(self.layers)
    keys_l = None if dropout_key is None else jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(n))
    impl = self.attention_impl
    sliding = self.config.sliding_layers()
    sliding_l, windowed_bts = None, None
    if window_ts is not None and any(sliding):
      windowed_bts = allowed_bts & window_ts[None]
      if all(sliding):
        allowed_bts = windowed_bts
      else:
        sliding_l = jnp.asarray(sliding)

    def layer(x_btd, layer_state, key, layer_prefix_kv, layer_sliding, rows_b):
      mask_bts = allowed_bts if layer_sliding is None else jnp.where(layer_sliding, windowed_bts, allowed_bts)
      return nnx.merge(graphdef, layer_state)(x_btd, cos_btd, sin_btd, mask_bts, key, layer_prefix_kv, rows_b,
                                              impl, cache_index)

    policy = remat_policy_name(self.remat)
    if policy:
      layer = jax.checkpoint(layer, policy=REMAT_POLICIES[policy])
    # With `rows_b` the last layer runs only those rows: it is called apart, after the others.
    body_n = n if rows_b is None else n - 1
    per_layer = (stacked, keys_l, prefix_kv, sliding_l)
    if self.scan_layers:
      def body(x_btd, xs):
        return layer(x_btd, *xs, None)
      x_btd, kv = jax.lax.scan(body, x_btd, _layer_slice(per_layer, slice(0, body_n)))
      kvs = [kv]
    else:
      kvs = []
      for i in range(body_n):
        x_btd, kv = layer(x_btd, *_layer_slice(per_layer, i), None)
        kvs.append(jax.tree.map(lambda a: a[None], kv))
    if rows_b is not None:
      x_btd, kv = layer(x_btd, *_layer_slice(per_layer, n - 1), rows_b)
      kvs.append(jax.tree.map(lambda a: a[None], kv))
    kv = kvs[0] if len(kvs) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *kvs)
    return x_btd, kv

  def token_nll(self, h_nd: jax.Array, targets_n: jax.Array, chunk: int = 1024) -> jax.Array:
    """-log p(target) per row of hidden states `[n, d]`, as `lm_logits` then cross-entropy but without
    materialising `[n, vocab]` logits (`linear_cross_entropy`)."""
    if self.lm_head is None:
      w_dv = self.embed_tokens.embedding[...].T
    else:
      w_dv = self.lm_head.weight(self.dtype)
    return linear_cross_entropy(h_nd, w_dv, targets_n, chunk)

  def lm_logits(self, h_xd: jax.Array) -> jax.Array:
    """float32 logits from hidden states of any leading shape."""
    if self.lm_head is None:
      table_vd = self.embed_tokens.embedding[...]
      return frozen_matmul(h_xd.astype(table_vd.dtype), table_vd.T)
    return self.lm_head(h_xd, out_dtype=jnp.float32)

  def __call__(self, tokens_bt=None, positions_bt=None, attention_mask_bt=None, *,
               inputs_embeds_btd=None, dropout_key=None) -> jax.Array:
    h_btd = self.hidden_states(tokens_bt, positions_bt, attention_mask_bt,
                               inputs_embeds_btd=inputs_embeds_btd, dropout_key=dropout_key)
    return self.lm_logits(h_btd)

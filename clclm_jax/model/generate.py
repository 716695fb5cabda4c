"""Batched autoregressive generation with a key/value cache: greedy, temperature / top-p sampling, beam search.

`generate(model, tokenizer, prompts, ...)` left-pads the prompts, prefills a preallocated `KVCache`
(`Llama.decode` at slot 0) and then runs one token per step inside a `jax.lax.while_loop`, all under one
`jax.jit` per (model graph, batch shape, max_new_tokens, mode): no recompilation per token, and none for
another temperature, top-p, length penalty, key or stop set. Everything here is a pure function; random draws
come only from the `key` argument (step s draws from `fold_in(key, s)`).
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clclm_jax.model.errors import ModelError
from clclm_jax.model.llama import KVCache, Llama


@dataclasses.dataclass(frozen=True)
class Generation:
  """What `generate` returns, per prompt (b) and returned sequence (r, best first for beams).

  `tokens_brn`: generated ids `[b, r, max_new_tokens]` (int32), the stop token included, `pad_token_id` after it;
  `lengths_br`: generated tokens per sequence (the stop token counted); `scores_br`: sum of log-probabilities
  of the generated tokens under the model (float32, untempered), divided by `length ** length_penalty` for
  beam search; `texts_br`: the decoded sequences (special tokens skipped, cut before the first newline when
  `stop_at_newline`), None without a tokenizer."""

  tokens_brn: np.ndarray
  lengths_br: np.ndarray
  scores_br: np.ndarray
  texts_br: list[list[str]] | None

  @property
  def texts(self) -> list[str] | None:
    """The first (best, for beams) text per prompt."""
    return None if self.texts_br is None else [t[0] for t in self.texts_br]


def top_p_mask(logits_bv: jax.Array, top_p) -> jax.Array:
  """The nucleus `[b, v]` (bool): the most probable tokens, in decreasing probability, up to and including the
  first one at which their total probability reaches `top_p`; the top token is always kept, and `top_p >= 1`
  keeps every token."""
  probs_bv = jax.nn.softmax(logits_bv.astype(jnp.float32), axis=-1)
  order_bv = jnp.argsort(-probs_bv, axis=-1)
  sorted_bv = jnp.take_along_axis(probs_bv, order_bv, axis=-1)
  keep_sorted_bv = (jnp.cumsum(sorted_bv, axis=-1) - sorted_bv) < top_p
  rows_b1 = jnp.arange(logits_bv.shape[0])[:, None]
  keep_bv = jnp.zeros(logits_bv.shape, bool).at[rows_b1, order_bv].set(keep_sorted_bv)
  return keep_bv | (top_p >= 1.0)


def sample_tokens(key: jax.Array, logits_bv: jax.Array, temperature, top_p) -> jax.Array:
  """One token per row from softmax(logits / temperature) restricted to its `top_p` nucleus (`[b]` int32)."""
  scaled_bv = logits_bv.astype(jnp.float32) / temperature
  scaled_bv = jnp.where(top_p_mask(scaled_bv, top_p), scaled_bv, -jnp.inf)
  return jax.random.categorical(key, scaled_bv, axis=-1).astype(jnp.int32)


def _prefill(model: Llama, tokens_bt, mask_bt, max_new_tokens: int):
  """Next-token logits `[b, v]` after left-padded prompts, and the cache holding them (`t + max_new_tokens` slots)."""
  b, t = tokens_bt.shape
  h_bd, cache = model.decode(tokens_bt, model.init_cache(b, t + max_new_tokens), 0, mask_bt, last_only=True)
  return model.lm_logits(h_bd), cache


def _step(model: Llama, tokens_b, cache: KVCache, index):
  """Feeds one token per row at slot `index`: next-token logits `[b, v]` and the updated cache."""
  h_btd, cache = model.decode(tokens_b[:, None], cache, index)
  return model.lm_logits(h_btd[:, 0]), cache


def _take_rows(cache: KVCache, rows) -> KVCache:
  """Cache rows `rows` (repeat, or reorder after a beam step)."""
  return KVCache(cache.k_lbskd[:, rows], cache.v_lbskd[:, rows], cache.valid_bs[rows])


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "sample", "num_return"))
def _sample_loop(graphdef, state, tokens_bt, mask_bt, stop_v, pad_id, key, temperature, top_p, *,
                 max_new_tokens: int, sample: bool, num_return: int):
  """Greedy (`sample=False`) or sampled decoding of `num_return` sequences per prompt, rows prompt-major."""
  model = nnx.merge(graphdef, state)
  t, n = tokens_bt.shape[1], max_new_tokens
  logits_bv, cache = _prefill(model, tokens_bt, mask_bt, n)
  if num_return > 1:
    rows = jnp.repeat(jnp.arange(tokens_bt.shape[0]), num_return)
    logits_bv, cache = logits_bv[rows], _take_rows(cache, rows)
  b = logits_bv.shape[0]

  def body(carry):
    s, logits_bv, cache, out_bn, len_b, logp_b, done_b = carry
    logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    if sample:
      tok_b = sample_tokens(jax.random.fold_in(key, s), logits_bv, temperature, top_p)
    else:
      tok_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    tok_b = jnp.where(done_b, pad_id, tok_b)
    out_bn = out_bn.at[:, s].set(tok_b)
    logp_b = logp_b + jnp.where(done_b, 0.0, jnp.take_along_axis(logp_bv, tok_b[:, None], axis=-1)[:, 0])
    len_b = len_b + (~done_b).astype(jnp.int32)
    done_b = done_b | stop_v[tok_b]
    logits_bv, cache = _step(model, tok_b, cache, t + s)
    return s + 1, logits_bv, cache, out_bn, len_b, logp_b, done_b

  def cond(carry):
    return (carry[0] < n) & ~jnp.all(carry[-1])

  init = (jnp.int32(0), logits_bv, cache, jnp.full((b, n), pad_id, jnp.int32), jnp.zeros((b,), jnp.int32),
          jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool))
  _, _, _, out_bn, len_b, logp_b, _ = jax.lax.while_loop(cond, body, init)
  shape = (tokens_bt.shape[0], num_return)
  return out_bn.reshape(*shape, n), len_b.reshape(shape), logp_b.reshape(shape)


def _best(k: int, *pools):
  """The k best of concatenated pools `(tokens_bkn, score_bk, length_bk)`, best first."""
  tokens_bmn, score_bm, len_bm = (jnp.concatenate(parts, axis=1) for parts in zip(*pools))
  score_bk, idx_bk = jax.lax.top_k(score_bm, k)
  return (jnp.take_along_axis(tokens_bmn, idx_bk[..., None], axis=1), score_bk,
          jnp.take_along_axis(len_bm, idx_bk, axis=1))


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "num_beams", "num_return"))
def _beam_loop(graphdef, state, tokens_bt, mask_bt, stop_v, pad_id, length_penalty, *, max_new_tokens: int,
               num_beams: int, num_return: int):
  """Beam search: each step extends the k live beams by every token; the k best non-stop extensions live on,
  and the k best stop-token extensions enter a pool of finished hypotheses scored `logp / length**penalty`
  (the pool keeps the k best). A prompt is done when its `num_return`-th best finished score is at least the
  best score any live beam could still reach; at `max_new_tokens` its live beams join the pool. With
  k >= (number of non-stop tokens) ** (max_new_tokens - 1) this is an exhaustive search."""
  model = nnx.merge(graphdef, state)
  (b, t), k, n = tokens_bt.shape, num_beams, max_new_tokens
  logits_bv, cache = _prefill(model, tokens_bt, mask_bt, n)
  rows = jnp.repeat(jnp.arange(b), k)
  logits_rv, cache = logits_bv[rows], _take_rows(cache, rows)
  v = logits_rv.shape[-1]
  stop_m = jnp.tile(stop_v, k)  # over the flattened [k * v] candidates of a prompt
  neg = jnp.float32(-jnp.inf)

  def penalised(logp, length):
    return logp / jnp.asarray(length, jnp.float32) ** length_penalty

  def body(carry):
    s, logits_rv, cache, alive_bkn, alive_bk, pool, done_b = carry
    cand_bm = (alive_bk[..., None] + jax.nn.log_softmax(logits_rv, axis=-1).reshape(b, k, v)).reshape(b, k * v)

    def extend(masked_bm):
      logp_bk, idx_bk = jax.lax.top_k(masked_bm, k)
      src_bk, tok_bk = idx_bk // v, (idx_bk % v).astype(jnp.int32)
      tokens_bkn = jnp.take_along_axis(alive_bkn, src_bk[..., None], axis=1).at[:, :, s].set(tok_bk)
      return logp_bk, src_bk, tok_bk, tokens_bkn

    fin_bk, _, _, fin_bkn = extend(jnp.where(stop_m, cand_bm, neg))
    merged = _best(k, pool, (fin_bkn, penalised(fin_bk, s + 1), jnp.full((b, k), s + 1, jnp.int32)))
    pool = jax.tree.map(lambda old, new: jnp.where(done_b.reshape(-1, *[1] * (old.ndim - 1)), old, new),
                        pool, merged)
    alive_bk, src_bk, tok_bk, alive_bkn = extend(jnp.where(stop_m, neg, cand_bm))
    # Scores are <= 0: a longer hypothesis of a live beam scores at most its sum so far over the longest
    # length (penalty > 0), or over its present length (penalty <= 0).
    bound_b = penalised(alive_bk[:, 0], jnp.where(length_penalty > 0, n, s + 1))
    done_b = done_b | (pool[1][:, num_return - 1] >= bound_b)
    cache = _take_rows(cache, (jnp.arange(b)[:, None] * k + src_bk).reshape(-1))
    logits_rv, cache = _step(model, tok_bk.reshape(-1), cache, t + s)
    return s + 1, logits_rv, cache, alive_bkn, alive_bk, pool, done_b

  def cond(carry):
    return (carry[0] < n) & ~jnp.all(carry[-1])

  alive_bk = jnp.where(jnp.arange(k) == 0, 0.0, neg)[None].repeat(b, axis=0)  # one live beam to start
  empty_bkn = jnp.full((b, k, n), pad_id, jnp.int32)
  pool = (empty_bkn, jnp.full((b, k), neg), jnp.zeros((b, k), jnp.int32))
  init = (jnp.int32(0), logits_rv, cache, empty_bkn, alive_bk, pool, jnp.zeros((b,), bool))
  _, _, _, alive_bkn, alive_bk, pool, done_b = jax.lax.while_loop(cond, body, init)
  # Prompts still running after max_new_tokens steps: their live beams are hypotheses of length n.
  alive_score_bk = jnp.where(done_b[:, None], neg, penalised(alive_bk, n))
  tokens_bkn, score_bk, len_bk = _best(k, pool, (alive_bkn, alive_score_bk, jnp.full((b, k), n, jnp.int32)))
  return tokens_bkn[:, :num_return], len_bk[:, :num_return], score_bk[:, :num_return]


def _tokenize(tokenizer, prompts) -> list[list[int]]:
  ids = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if tokenizer is None:
        raise ModelError(f"tokenizer=None cannot tokenize prompts[{i}], a text: pass a tokenizer or token ids")
      p = tokenizer(p)["input_ids"]
    p = [int(x) for x in np.asarray(p).reshape(-1)]
    if not p:
      raise ModelError(f"prompts[{i}] has no tokens: every prompt needs at least one")
    ids.append(p)
  return ids


def newline_token_ids(tokenizer) -> list[int]:
  """Ids of the tokens whose text contains a newline."""
  texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
  return [i for i, text in enumerate(texts) if "\n" in text]


def _check(name: str, ok: bool, value, need: str):
  if not ok:
    raise ModelError(f"{name}={value!r} is invalid: {need}")


def generate(model: Llama, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             key: jax.Array | None = None, num_beams: int = 1, num_return_sequences: int = 1,
             length_penalty: float = 1.0, stop_token_ids: Sequence[int] | None = None,
             stop_at_newline: bool = False, pad_token_id: int | None = None,
             pad_to_multiple_of: int = 8) -> Generation:
  """Continues each prompt (text, tokenized by `tokenizer`, or token ids) by up to `max_new_tokens` tokens.

  Modes: greedy (`temperature=0`, `num_beams=1`, the default); sampling (`temperature > 0`, with `top_p`,
  from the explicit `key`; `num_return_sequences` samples per prompt); beam search (`num_beams > 1`, scored
  `sum log p / length ** length_penalty`, the `num_return_sequences` best per prompt). A sequence stops
  after a stop token: `stop_token_ids` (default: the tokenizer's, else the config's, EOS), plus every token
  holding a newline with `stop_at_newline`. Prompts are left-padded to a multiple of `pad_to_multiple_of`
  (fewer distinct shapes to compile). `tokenizer` may be None when the prompts are token ids.
  Bad arguments raise `ModelError` (a ValueError) naming the argument."""
  if isinstance(prompts, str):
    raise ModelError("prompts is one string: pass a list of prompts")
  prompts = list(prompts)
  _check("prompts", len(prompts) > 0, prompts, "pass at least one prompt")
  _check("max_new_tokens", isinstance(max_new_tokens, int) and max_new_tokens >= 1, max_new_tokens, "must be >= 1")
  _check("num_beams", isinstance(num_beams, int) and num_beams >= 1, num_beams, "must be >= 1")
  _check("num_return_sequences", isinstance(num_return_sequences, int) and num_return_sequences >= 1,
         num_return_sequences, "must be >= 1")
  _check("temperature", temperature >= 0, temperature, "must be >= 0 (0 is greedy)")
  _check("top_p", 0 < top_p <= 1, top_p, "must be in (0, 1]")
  _check("pad_to_multiple_of", isinstance(pad_to_multiple_of, int) and pad_to_multiple_of >= 1,
         pad_to_multiple_of, "must be >= 1")
  sample = temperature > 0
  if num_beams > 1:
    _check("temperature", not sample, temperature, "beam search does not sample: use 0 with num_beams > 1")
    _check("num_return_sequences", num_return_sequences <= num_beams, num_return_sequences,
           f"must be <= num_beams={num_beams}")
  elif not sample:
    _check("num_return_sequences", num_return_sequences == 1, num_return_sequences,
           "greedy decoding returns one sequence: sample (temperature > 0) or use num_beams")
  if sample and key is None:
    raise ModelError("key=None: sampling (temperature > 0) needs an explicit jax.random key")
  vocab = model.config.vocab_size
  eos = getattr(tokenizer, "eos_token_id", None)
  eos = model.config.eos_token_id if eos is None else eos
  stops = list(stop_token_ids) if stop_token_ids is not None else ([] if eos is None else [eos])
  if stop_at_newline:
    if tokenizer is None:
      raise ModelError("stop_at_newline=True needs a tokenizer to find the newline tokens")
    stops += [i for i in newline_token_ids(tokenizer) if i < vocab]
  bad = [i for i in stops if not 0 <= int(i) < vocab]
  _check("stop_token_ids", not bad, stop_token_ids, f"ids {bad} are outside the vocabulary [0, {vocab})")
  if pad_token_id is None:
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
  pad_token_id = pad_token_id if pad_token_id is not None else (eos if eos is not None else 0)

  ids = _tokenize(tokenizer, prompts)
  bad = sorted({x for p in ids for x in p if not 0 <= x < vocab})
  _check("prompts", not bad, f"<token ids {bad[:5]}>", f"token ids must be in [0, {vocab})")
  t = -(-max(map(len, ids)) // pad_to_multiple_of) * pad_to_multiple_of
  tokens_bt = np.full((len(ids), t), pad_token_id, np.int32)
  mask_bt = np.zeros((len(ids), t), np.int32)
  for i, p in enumerate(ids):
    tokens_bt[i, t - len(p):] = p
    mask_bt[i, t - len(p):] = 1
  stop_v = np.zeros(vocab, bool)
  stop_v[np.asarray(stops, np.int64)] = True

  graphdef, state = nnx.split(model)
  args = (graphdef, state, jnp.asarray(tokens_bt), jnp.asarray(mask_bt), jnp.asarray(stop_v),
          jnp.int32(pad_token_id))
  if num_beams > 1:
    out = _beam_loop(*args, jnp.float32(length_penalty), max_new_tokens=max_new_tokens, num_beams=num_beams,
                     num_return=num_return_sequences)
  else:
    out = _sample_loop(*args, key, jnp.float32(max(temperature, 1e-30)), jnp.float32(top_p),
                       max_new_tokens=max_new_tokens, sample=sample, num_return=num_return_sequences)
  tokens_brn, lengths_br, scores_br = (np.asarray(x) for x in out)
  texts_br = None
  if tokenizer is not None:
    texts_br = [[_text(tokenizer, row[:n], stop_at_newline) for row, n in zip(rows, lens)]
                for rows, lens in zip(tokens_brn, lengths_br)]
  return Generation(tokens_brn, lengths_br, scores_br, texts_br)


def _text(tokenizer, ids, stop_at_newline: bool) -> str:
  text = tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
  return text.split("\n", 1)[0] if stop_at_newline else text

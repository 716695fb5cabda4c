"""Shared builders for the train tests: a tiny int8 Llama with LoRA and synthetic batches."""

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.model.config import LoraConfig, presets
from clclm_jax.model.llama import Llama
from clclm_jax.model.lora import add_lora
from clclm_jax.train import checkpoint


def tiny_model(seed: int = 0, dropout: float = 0.1) -> Llama:
  """The `tiny` preset, int8 base, LoRA on q and v."""
  model = Llama(presets["tiny"], quantize="int8", rngs=nnx.Rngs(seed))
  return add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout), jax.random.PRNGKey(seed + 1))


def optim_config(**kw) -> ConfigDict:
  c = ConfigDict(dict(lr=1e-2, warmup_steps=2, total_steps=20, schedule="linear", max_grad_norm=1.0,
                      b1=0.9, b2=0.999, weight_decay=0.0))
  c.update(kw)
  return c


def synthetic_batches(n: int, batch: int = 8, length: int = 16, vocab: int = 256, seed: int = 0):
  """Left-padded random token batches with a loss mask on the real tokens."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lengths = rng.integers(length // 2, length + 1, size=batch)
    mask = (np.arange(length)[None] >= (length - lengths)[:, None]).astype(np.int32)
    tokens = rng.integers(3, vocab, size=(batch, length)).astype(np.int32) * mask
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    out.append({"tokens": tokens, "positions": positions, "attention_mask": mask, "loss_mask": mask})
  return out


class DiesAt:
  """A stage's batch iterator that calls `action` (raise, signal) when asked for batch `n`: after step n - 1 and
  its checkpoint, so a rerun shows what a death at that instant leaves behind."""

  def __init__(self, it, n: int, action):
    self.it, self.n, self.action, self.count = it, n, action, 0

  def __next__(self):
    self.count += 1
    if self.count == self.n:
      self.action()
    return next(self.it)

  def get_state(self):
    return self.it.get_state()

  def set_state(self, state):
    self.it.set_state(state)


def best_params(workdir):
  """(params, step) of WORKDIR's best checkpoint, restored untyped (numpy leaves)."""
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    step = ckpts.best_step()
    return ckpts.best.restore(step).params, step
  finally:
    ckpts.close()


def byte_llm():
  """The byte tokenizer and a tiny float32 Llama over its vocabulary with LoRA on q and v, B drawn at random so
  the adapters act: the toy language model of the next-item tests."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clclm_jax.model import build as model_build  # pylint: disable=g-import-not-at-top
  tok = model_build.byte_tokenizer()
  cfg = dataclasses.replace(presets["tiny"], vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
  llm = model_build.random_model(cfg, LoraConfig(r=4, alpha=8, dropout=0.0), dtype=jnp.float32, quantize=None,
                                 seed=0)
  for _, lin in llm.projections(("q_proj", "v_proj")):
    lin.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(2), lin.lora_b.shape)
  return tok, llm


def nt_xent(a_nd, b_nd, tau, *, valid_n=None, cosine=True, same_side=True) -> float:
  """InfoNCE over 2N views in float64, each view's positive its pair: NT-Xent, or CLIP's loss without same-side
  negatives. Invalid pairs take no part, as if absent."""
  valid_n = np.ones(len(a_nd), bool) if valid_n is None else np.asarray(valid_n, bool)
  z = np.concatenate([np.asarray(a_nd, np.float64)[valid_n], np.asarray(b_nd, np.float64)[valid_n]])
  if cosine:
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n = int(valid_n.sum())
  s = z @ z.T / tau
  if not same_side:
    s[:n, :n], s[n:, n:] = -np.inf, -np.inf
  np.fill_diagonal(s, -np.inf)
  pos = np.r_[np.arange(n, 2 * n), np.arange(n)]
  top = s.max(1, keepdims=True)
  lse = np.log(np.exp(s - top).sum(1)) + top[:, 0]
  return float(np.mean(lse - s[np.arange(2 * n), pos]))

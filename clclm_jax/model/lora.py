"""LoRA by hand: attach adapters to named projections, and fold them back into the base."""

import jax
import jax.numpy as jnp

from clclm_jax.model.config import LoraConfig
from clclm_jax.model.llama import Llama


def add_lora(model: Llama, cfg: LoraConfig, key: jax.Array) -> Llama:
  """Adds LoRA A/B (`nnx.LoRAParam`) to every target projection, in place; returns the model. Each target's
  A and B are stacked over the decoder layers (`[layers, in, r]`, `[layers, r, out]`)."""
  for j, (_, lin) in enumerate(model.projections(cfg.targets)):
    lin.add_lora(cfg, jax.random.fold_in(key, j))
  model.lora_config = cfg
  return model


def merge_lora(model: Llama) -> Llama:
  """Folds W + A @ B * alpha / r into the base weights and drops LoRA, in place; returns the model.

  An int8 model is re-quantised and stays int8, which adds a little rounding error; merge a float
  model when exact equality with the adapted model matters.
  """
  for _, lin in model.projections():
    if lin.lora_a is not None:
      delta_io = lin.lora_a[...] @ lin.lora_b[...] * lin.lora_scaling  # batched over the stacked layers
      lin.set_kernel(lin.weight(jnp.float32) + delta_io)
      lin.lora_a = None
      lin.lora_b = None
  model.lora_config = None
  return model

"""Symmetric per-output-channel int8 weights and model memory accounting."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def quantize_int8(w_io: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Absmax int8 over each output column: w ~= q * scale, q in [-127, 127]."""
  w_io = jnp.asarray(w_io, jnp.float32)
  scale_o = jnp.max(jnp.abs(w_io), axis=0) / 127.0
  scale_o = jnp.where(scale_o == 0, 1.0, scale_o)
  q_io = jnp.clip(jnp.round(w_io / scale_o), -127, 127).astype(jnp.int8)
  return q_io, scale_o


def dequantize(q_io: jax.Array, scale_o: jax.Array, dtype=jnp.float32) -> jax.Array:
  """The float weight an int8 kernel stands for."""
  return (q_io.astype(jnp.float32) * scale_o).astype(dtype)


def model_bytes(model: nnx.Module) -> int:
  """Bytes held by all variables of a model (works on abstract models from `nnx.eval_shape`)."""
  leaves = jax.tree.leaves(nnx.state(model))
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))

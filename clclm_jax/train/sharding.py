"""Device mesh (data, fsdp, tensor) and the one table mapping logical axis names to mesh axes."""

from collections.abc import Sequence
import math
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from flax import nnx

from clclm_jax.train.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. Names not listed here are replicated.
RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "lora_rank": None,
    "norm": None,
    "layers": None,
    # The behaviour encoder (contrastive/encoder.py) and the fused model's heads: the item table like the
    # vocabulary, the encoder's heads and MLP like the LLM's; its hidden width (64) stays whole.
    "items": "tensor",
    "enc_embed": None,
    "enc_heads": "tensor",
    "enc_mlp": "tensor",
}


def maybe_initialize_distributed(config) -> None:
  """Joins a multi-process run when `config.distributed` or JAX_COORDINATOR_ADDRESS asks for it."""
  address = config.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address or jax.distributed.is_initialized():  # not asked for, or joined already (idempotent)
    return
  num_processes = config.get("num_processes") or int(os.environ["JAX_NUM_PROCESSES"])
  process_id = config.get("process_id")
  if process_id is None or process_id < 0:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one -1 entry takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  given, shape = tuple(shape), list(shape)
  if len(shape) != 3 or shape.count(-1) > 1 or not all(s > 0 or s == -1 for s in shape):
    raise ConfigError(f"config.mesh={given}: give 3 sizes (data, fsdp, tensor), positive, at most one -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    shape[shape.index(-1)] = len(devices) // known if len(devices) % known == 0 else 0
  if math.prod(shape) != len(devices):
    raise ConfigError(f"config.mesh={given} does not divide the {len(devices)} devices: give sizes whose product "
                      f"is {len(devices)} (-1 takes the rest)")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def logical_to_spec(names: Sequence[str | None] | None) -> P:
  """PartitionSpec for a tuple of logical axis names, through RULES."""
  if not names:
    return P()
  return P(*(RULES.get(n) if n is not None else None for n in names))


def _variable_spec(v: nnx.Variable) -> P:
  meta = v.get_metadata()
  names = meta.get("out_sharding") or meta.get("sharding_names")
  spec = logical_to_spec(names)
  if len(spec) > v.get_value().ndim:
    raise ValueError(f"variable of shape {v.get_value().shape} has sharding names {names} of another rank")
  return spec


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. a 3-way head count on 2 devices)."""
  out = []
  for axes, dim in zip(spec, shape):
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in axes_t)
    out.append(axes if axes_t and dim % size == 0 else None)
  return P(*out)


def state_sharding(state, mesh: Mesh):
  """NamedShardings for an nnx.State (or any tree of Variables), from the variables' axis names."""
  def one(v):
    if isinstance(v, nnx.Variable):
      return v.replace(NamedSharding(mesh, _fit(_variable_spec(v), v.get_value().shape, mesh)))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, P(RULES["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, _fit(logical_to_spec(names), x.shape, mesh))


def put(tree, shardings):
  """Places host or single-device values on (possibly multi-process) shardings; every process holds the same values."""
  def one(x, sh):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows into global arrays split over (data, fsdp).

  Each process pads its own rows, so on several processes the widths are first agreed (`agree_widths`):
  every process must see the same global shapes, or each would compile and run a different program.
  """
  batch = {k: np.asarray(v) for k, v in batch.items()}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    batch = agree_widths(batch, multihost_utils.process_allgather(local_widths(batch)).max(axis=0))
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def local_widths(batch: dict[str, np.ndarray]) -> np.ndarray:
  """Every array's non-batch dimensions, keys in sorted order, as one int vector."""
  return np.array([n for k in sorted(batch) for n in batch[k].shape[1:]], np.int64)


def agree_widths(batch: dict[str, np.ndarray], widths: np.ndarray) -> dict[str, np.ndarray]:
  """Right-pads every array with 0 to `widths` (as laid out by `local_widths`); 0 is padding in every batch
  array that is padded per batch (tokens, masks, segment ids, target positions)."""
  out, i = {}, 0
  for k in sorted(batch):
    v = batch[k]
    pad = [(0, 0)] + [(0, int(w) - n) for w, n in zip(widths[i:i + v.ndim - 1], v.shape[1:])]
    out[k] = np.pad(v, pad) if any(p for _, p in pad) else v
    i += v.ndim - 1
  return out

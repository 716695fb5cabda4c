"""Runs a few train steps of the tiny model on a given mesh and prints the losses as JSON.

Used by the sharding tests in a subprocess (8 simulated CPU devices, or 2 processes).
"""

import json
import sys

import jax
import numpy as np

import train_helpers
from clclm_jax.train import sharding, state as state_lib, step as step_lib


def trajectory(mesh_shape, devices=None, steps: int = 4, accum_steps: int = 1) -> list[float]:
  model = train_helpers.tiny_model()
  graphdef, params, frozen = state_lib.split_model(model)
  tx = state_lib.make_optimizer(train_helpers.optim_config())
  mesh = sharding.make_mesh(mesh_shape, devices)
  state = state_lib.init_state(params, tx, seed=0, mesh=mesh)
  step = step_lib.compile_train_step(graphdef, frozen, tx, state_lib.state_shardings(params, tx, mesh), mesh,
                                     loss_weights={"lm": 1.0}, accum_steps=accum_steps)
  rows = slice(jax.process_index() * 8 // jax.process_count(), (jax.process_index() + 1) * 8 // jax.process_count())
  losses = []
  with jax.set_mesh(mesh):
    for batch in train_helpers.synthetic_batches(steps):
      state, metrics = step(state, sharding.global_batch({k: v[rows] for k, v in batch.items()}, mesh))
      losses.append(float(metrics["loss"]))
  return losses


def main(argv):
  if argv[1] == "meshes":
    out = {"1": trajectory((1, 1, 1), jax.devices()[:1])}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
      out[str(shape)] = trajectory(shape)
  else:  # "process <id> <port>": one of two processes with one CPU device each.
    jax.distributed.initialize(f"localhost:{argv[3]}", num_processes=2, process_id=int(argv[2]))
    out = {"losses": trajectory((-1, 1, 1))}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv)

"""Runs a few train steps of the tiny model on a given mesh and prints the losses as JSON.

Used by the sharding tests in a subprocess (8 simulated CPU devices, or 2 processes).
"""

import json
import pathlib
import sys

import jax
import numpy as np

import grain
import train_helpers
from clclm_jax.data import pipeline
from clclm_jax.train import cli, evaluate, sharding, state as state_lib, step as step_lib


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


def eval_examples(n: int = 21) -> grain.MapDataset:
  """Prompts sharing a 20-token prefix (one shares only 17), ragged lengths (one long prompt, so two shards
  pad their last batches to different widths), labels 0/1."""
  rng = np.random.default_rng(0)
  prefix = rng.integers(3, 256, 20)
  out = []
  for i in range(n):
    tokens = np.r_[prefix, rng.integers(3, 256, 70 if i == 20 else int(rng.integers(5, 40)))].astype(np.int32)
    if i == 13:
      tokens[17] = 1
    out.append({"tokens": tokens, "loss_mask": np.ones_like(tokens), "answer_index": np.int32(len(tokens) - 1),
                "label": np.int32(i % 2), "user_ids": np.int32(0), "index": np.int32(i),
                "history_ids": np.zeros(4, np.int32)})
  return grain.MapDataset.source(out)


def eval_scores(mesh_shape, devices=None) -> list[float]:
  """P(Yes) by record index; each process scores its own shard of the examples."""
  model = train_helpers.tiny_model(dropout=0.0)
  graphdef, params, frozen = state_lib.split_model(model)
  mesh = sharding.make_mesh(mesh_shape, devices)
  step = evaluate.compile_eval_step(graphdef, sharding.state_sharding(params, mesh),
                                    sharding.state_sharding(frozen, mesh), mesh, 7, 9)
  batches = pipeline.eval_dataset(eval_examples(), batch_size=8 // jax.process_count(), pad_multiple=16)
  with jax.set_mesh(mesh):
    s = evaluate.score(step, sharding.put(params, sharding.state_sharding(params, mesh)),
                       sharding.put(frozen, sharding.state_sharding(frozen, mesh)), batches, mesh)
  assert list(s.index) == list(range(21)), s.index
  return s.p_yes.tolist()


def last_eval_batch_shape(mesh_shape) -> list[int]:
  """Global shape of the last eval batch's tokens (its shards' own widths differ on two processes)."""
  mesh = sharding.make_mesh(mesh_shape)
  batches = pipeline.eval_dataset(eval_examples(), batch_size=8 // jax.process_count(), pad_multiple=16)
  with jax.set_mesh(mesh):
    return list(sharding.global_batch(batches[len(batches) - 1], mesh)["tokens"].shape)


def recipe_run(mesh_shape, workdir, **distributed) -> dict:
  """The CLCLMRec recipe on the tiny model (encoder pretraining, 1 text step, 2 fused steps) on a mesh: every
  stage's losses, and the encoder's, valid and test AUCs. The sequence augmentation (seq_cl) is off: its compile
  is most of the recipe's, paid once per mesh; test_cli's tiny_fused run trains the recipe with it."""
  from clclm_jax.contrastive import recipe  # pylint: disable=g-import-not-at-top
  from configs import tiny_fused  # pylint: disable=g-import-not-at-top
  c = tiny_fused.get_config()
  c.mesh, c.train.batch_size, c.train.micro_batch_size, c.train.eval_batch_size = tuple(mesh_shape), 8, 8, 8
  c.stage1.steps, c.stage2.steps = 1, 2
  c.fusion.pretrain.cl_weight = c.stage2.loss_weights.seq_cl = 0.0
  c.update(distributed)
  summary = recipe.train(c, workdir, log=lambda _: None)
  losses = {sub or "fused": [json.loads(line)["train/loss"] for line in
                             (pathlib.Path(workdir) / sub / "metrics.jsonl").read_text().splitlines()]
            for sub in ("encoder", "text", "")}
  return {"losses": losses, **{k: summary[k] for k in ("encoder_valid_auc", "valid_auc", "test_auc")}}


def main(argv):
  cli.enable_compilation_cache(1.0)  # train.py's cache, as the test process's (tests/conftest.py)
  if argv[1] == "meshes":
    out = {"1": trajectory((1, 1, 1), jax.devices()[:1])}
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
      out[str(shape)] = trajectory(shape)
    out["eval"] = {"1": eval_scores((1, 1, 1), jax.devices()[:1]), "(2, 2, 2)": eval_scores((2, 2, 2))}
  elif argv[1] == "recipe":  # "recipe <workdir> <mesh shapes as JSON>"
    out = {str(tuple(m)): recipe_run(m, pathlib.Path(argv[2]) / "x".join(map(str, m))) for m in json.loads(argv[3])}
  elif argv[1] == "recipe_process":  # "recipe_process <workdir> <id> <port>": one of two processes
    out = recipe_run((-1, 1, 1), argv[2], coordinator_address=f"localhost:{argv[4]}", num_processes=2,
                     process_id=int(argv[3]))
  else:  # "process <id> <port>": one of two processes with one CPU device each.
    jax.distributed.initialize(f"localhost:{argv[3]}", num_processes=2, process_id=int(argv[2]))
    out = {"losses": trajectory((-1, 1, 1)), "eval": eval_scores((-1, 1, 1)),
           "last_eval_shape": last_eval_batch_shape((-1, 1, 1))}
  print(json.dumps(out))


if __name__ == "__main__":
  main(sys.argv)

"""orbax checkpoints of one stage (`train/trainer.py`): the latest train state (for exact resume) and the best
trainable params.

Saved: trainable params, optimizer state, step, random key, data-iterator state and a JSON `meta`
(config, early stopping, metrics). Not saved: the frozen base, which is rebuilt from its source.
"""

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from clclm_jax.train.errors import ConfigError
from clclm_jax.train.state import TrainState


def write_text(path: pathlib.Path, text: str) -> pathlib.Path:
  """A small run file (config.json, metrics.jsonl, predictions) written whole: a temporary sibling, then a rename."""
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)
  return path


def _manager(directory: pathlib.Path, max_to_keep: int = 1) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.absolute(), options=options)


def abstract(tree):
  """Shapes, dtypes and shardings of `tree`, the target to restore into."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def check_finite(tree, what: str) -> None:
  """Refuses to write NaN or inf to disk. One program checks every leaf (a check per leaf compiled two small
  programs for each parameter shape: ~35 compiles a stage)."""
  floats = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  finite = jax.device_get(_all_finite([x for _, x in floats])) if floats else []
  bad = [jax.tree_util.keystr(path) for (path, _), ok in zip(floats, finite) if not ok]
  if bad:
    raise FloatingPointError(f"not saving {what}: non-finite values in {bad[:3]}")


def _save_params(manager: ocp.CheckpointManager, step: int, params, meta: dict[str, Any], what: str) -> None:
  """Saves over a checkpoint of the same step (a run killed after this save and rerun reaches it again)."""
  check_finite(params, what)
  if step in manager.all_steps():
    manager.delete(step)
  manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)),
               force=True)


def _restore_params(manager: ocp.CheckpointManager, step: int, target_params) -> tuple[Any, dict]:
  r = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract(target_params)),
                                                     meta=ocp.args.JsonRestore()))
  return r["params"], r["meta"]


class Checkpoints:
  """`WORKDIR/checkpoints/latest/<step>` (full state) and `best/<step>` (params)."""

  def __init__(self, workdir: str | pathlib.Path):
    self.root = pathlib.Path(workdir) / "checkpoints"
    self.latest = _manager(self.root / "latest", max_to_keep=2)  # the previous one too: a fallback
    self.best = _manager(self.root / "best")

  def save_latest(self, state: TrainState, data_state: dict[str, Any], meta: dict[str, Any]) -> None:
    check_finite(state["params"], "the latest checkpoint")
    step = int(state["step"])
    if self.latest.latest_step() == step:
      return
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)))

  def restore_latest(self, target: TrainState, log=print) -> tuple[TrainState, dict, dict] | None:
    """(state, data-iterator state, meta) of the newest checkpoint that reads back, or None when there is none.
    An unreadable newest one (a disk that filled mid-save, a damaged file) is passed over for the previous one,
    with one line saying so; when none reads, the error names the folder to delete."""
    steps = sorted(self.latest.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      try:
        r = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract(target)), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds for a damaged checkpoint)
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if i + 1 < len(steps):
          log(f"checkpoint {self.latest.directory}/{step} is unreadable ({why}): deleted, going on from step "
              f"{steps[i + 1]}")
          self.latest.delete(step)  # the rerun reaches this step again and saves it anew
          continue
        raise ConfigError(f"no readable checkpoint in {self.latest.directory} (step {step}: {why}): delete that "
                          "folder to start this stage again") from None
      return r["state"], r["data"], r["meta"]
    return None

  def save_best(self, step: int, params, meta: dict[str, Any]) -> None:
    _save_params(self.best, step, params, meta, "the best checkpoint")

  def reset_best(self, step: int, params, meta: dict[str, Any]) -> None:
    """Replaces the best checkpoint by one at `step`, an earlier step too (a stage's start that a later check
    kept over its best validated step)."""
    check_finite(params, "the best checkpoint")  # before deleting: a refused save leaves the old best in place
    for old in self.best.all_steps():
      self.best.delete(old)
    self.save_best(step, params, meta)

  def best_step(self) -> int | None:
    return self.best.latest_step()

  def restore_best(self, target_params) -> tuple[Any, dict]:
    """(params, meta) of the best checkpoint; raises FileNotFoundError when there is none."""
    step = self.best.latest_step()
    if step is None:
      raise FileNotFoundError(f"no best checkpoint under {self.best.directory}: train first")
    return _restore_params(self.best, step, target_params)

  def close(self) -> None:
    for manager in (self.latest, self.best):
      manager.close()

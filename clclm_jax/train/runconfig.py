"""WORKDIR/config.json: the config a run trained with, readable, and checked when the run is resumed or scored.

Resuming with other values would silently mix two runs (another learning rate, other shots under a restored
data iterator), and scoring with another LoRA shape or base model fails deep in a restore or, for `lora.alpha`,
silently scales the adapter differently; both are stopped with the fields that differ.
"""

import json
import pathlib

from ml_collections import ConfigDict

from clclm_jax.train import checkpoint
from clclm_jax.train.errors import ConfigError

# Fields a resumed run may change: how long and how often, how scoring is batched, the hardware layout.
RESUMABLE = ("name", "mesh", "coordinator_address", "num_processes", "process_id", "model.remat",
             "train.max_steps", "train.num_epochs", "train.eval_every", "train.patience", "train.checkpoint_every",
             "train.eval_batch_size", "train.micro_batch_size", "data.test_size", "data.eval_widths",
             "data.files.test")
# Fields that define the trained model: scoring (eval.py, PEFT export) must use the same.
MODEL = ("model.source", "model.preset", "model.tokenizer", "lora.r", "lora.alpha", "lora.targets", "fusion.")
MODEL_EXCEPT = ("fusion.pretrain.",)


def flat(config: ConfigDict | dict) -> dict[str, object]:
  """`{"optim.lr": 1e-4, ...}` with JSON values (tuples as lists), so saved and live configs compare equal."""
  tree = json.loads(json.dumps(config.to_dict() if isinstance(config, ConfigDict) else config))
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        out[prefix + k] = v
  walk(tree, "")
  return out


def _differences(saved: dict, now: dict, keep) -> list[str]:
  return [f"{k}: {saved.get(k, '(absent)')!r} in the run, {now.get(k, '(absent)')!r} now"
          for k in sorted(set(saved) | set(now)) if keep(k) and saved.get(k) != now.get(k)]


def _saved(workdir: pathlib.Path) -> dict | None:
  path = workdir / "config.json"
  return flat(json.loads(path.read_text())) if path.is_file() else None


def save(config: ConfigDict, workdir: pathlib.Path) -> None:
  """Writes WORKDIR/config.json."""
  checkpoint.write_text(workdir / "config.json", json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def check_resume(config: ConfigDict, workdir: pathlib.Path) -> None:
  """Raises ConfigError when WORKDIR holds a run whose config differs outside `RESUMABLE`."""
  saved = _saved(workdir)
  if saved is None:
    return
  diff = _differences(saved, flat(config), lambda k: not k.startswith(RESUMABLE))
  if diff:
    raise ConfigError(f"{workdir} holds a run with another config ({'; '.join(diff)}): rerun with the run's "
                      f"values to resume it (see {workdir / 'config.json'}), or pass a new --workdir")


def check_model(config: ConfigDict, workdir: pathlib.Path) -> None:
  """Raises ConfigError when the model `config` builds is not the one WORKDIR's run trained (`MODEL` fields)."""
  saved = _saved(workdir)
  if saved is None:
    return
  diff = _differences(saved, flat(config), lambda k: k.startswith(MODEL) and not k.startswith(MODEL_EXCEPT))
  if diff:
    raise ConfigError(f"{workdir} was trained with another model ({'; '.join(diff)}): score it with the config "
                      f"it trained with (see {workdir / 'config.json'})")

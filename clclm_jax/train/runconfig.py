"""WORKDIR/config.json: the config a run trained with, readable, and checked when the run is resumed or scored.

Resuming with other values would silently mix two runs (another learning rate, other shots under a restored
data iterator), and scoring with another LoRA shape or base model fails deep in a restore or, for `lora.alpha`,
silently scales the adapter differently; both are stopped with the fields that differ.
"""

import json
import math
import pathlib

from ml_collections import ConfigDict

from clclm_jax.train import checkpoint
from clclm_jax.train.errors import ConfigError

# Fields a resumed run may change: how long and how often, how scoring is batched, the hardware layout.
RESUMABLE = ("name", "mesh", "coordinator_address", "num_processes", "process_id", "model.remat",
             "model.attention_impl", "train.max_steps", "train.num_epochs", "train.eval_every", "train.patience",
             "train.checkpoint_every", "train.eval_batch_size", "train.micro_batch_size", "data.test_size",
             "data.eval_widths", "data.files.test", "data.allow_test_in_train",
             # how generated answers decode (candidate ranking): scoring, not training; older runs lack the fields
             "eval.temperature", "eval.top_p", "eval.num_beams",
             # where a unified run's stage 1 lives: that folder's own config is checked against the run's stage 1
             "unified.text_workdir")
# Fields that define the trained model: scoring (eval.py, PEFT export) must use the same.
MODEL = ("model.source", "model.preset", "model.tokenizer", "lora.r", "lora.alpha", "lora.targets", "fusion.")
MODEL_EXCEPT = ("fusion.pretrain.", "fusion.residual_confirm_size")  # how it trains, not what it is
# Fused-recipe fields added after runs were saved: an older run's config.json lacks them and ran as these values.
ADDED_FUSED = {"fusion.mode": "soft_tokens", "fusion.residual_gate": False, "fusion.residual_soft_tokens": False,
               "fusion.residual_confirm_size": 0, "stage2.loss_weights.residual_answer": 0.0}


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
  if not path.is_file():
    return None
  saved = flat(json.loads(path.read_text()))
  return {**ADDED_FUSED, **saved} if any(k.startswith("fusion.") for k in saved) else saved


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


def trained_domain(workdir: pathlib.Path) -> str | None:
  """The `data.domain` WORKDIR's run trained on (None without a config.json)."""
  saved = _saved(pathlib.Path(workdir))
  return None if saved is None else saved.get("data.domain")


def eval_name(config: ConfigDict, workdir: pathlib.Path, split: str) -> str:
  """The name of a scoring's files in WORKDIR/eval: the split, or `<split>_<domain>` when the run is scored on
  another domain than it trained on (TALLRec's cross-domain test), so its own domain's files are kept."""
  trained = trained_domain(workdir)
  return split if trained in (None, config.data.domain) else f"{split}_{config.data.domain}"


def _fail(field: str, value, why: str) -> None:
  raise ConfigError(f"config.{field}={value!r}: {why}")


def validate(config: ConfigDict) -> None:
  """Checks the fields a TALLRec or fused run reads before anything is built: each bad value stops with one line
  naming the field and what it takes (a rate of 0 or below trains nothing or climbs the loss, a size of 0
  divides by zero later, a preset ignores `model.source`)."""
  from clclm_jax.model import loading  # pylint: disable=g-import-not-at-top
  o, t, m = config.optim, config.train, config.model
  if not (isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and 0 < o.lr <= 1.0):
    _fail("optim.lr", o.lr, "use a learning rate in (0, 1] (LoRA: 1e-4 .. 3e-3)")
  for field in ("warmup_steps",):
    if o[field] < 0:
      _fail(f"optim.{field}", o[field], "use 0 or more")
  for field in ("b1", "b2"):
    if not 0 <= o[field] < 1:
      _fail(f"optim.{field}", o[field], "use a value in [0, 1)")
  if o.weight_decay < 0:
    _fail("optim.weight_decay", o.weight_decay, "use 0 or more")
  for field in ("batch_size", "micro_batch_size", "eval_batch_size"):
    if not isinstance(t[field], int) or t[field] <= 0:
      _fail(f"train.{field}", t[field], "use a positive whole number")
  if t.batch_size % t.micro_batch_size:
    _fail("train.batch_size", t.batch_size, f"use a multiple of train.micro_batch_size={t.micro_batch_size}")
  for field in ("checkpoint_every", "eval_every"):
    if not isinstance(t[field], int):
      _fail(f"train.{field}", t[field], "use a whole number (0: only at the end)")
  if m.dtype not in loading.DTYPES:
    _fail("model.dtype", m.dtype, f"use one of {sorted(loading.DTYPES)}")
  from clclm_jax.model import llama  # pylint: disable=g-import-not-at-top
  if m.remat not in ("", "full", "dots", False, True):
    _fail("model.remat", m.remat, "use '' (none), 'full' or 'dots'")
  if m.attention_impl not in llama.ATTENTION_IMPLS:
    _fail("model.attention_impl", m.attention_impl, f"use one of {', '.join(llama.ATTENTION_IMPLS)}")
  if m.preset and m.source:
    _fail("model.source", m.source, f"model.preset={m.preset!r} builds a random model and reads no source: set "
          "one of the two (--config.model.preset='' to load the source)")
  if "fusion" in config:
    _validate_fusion(config)


def _validate_fusion(config: ConfigDict) -> None:
  """Residual fusion (contrastive/fusion.py): the mode, its switches, and the stages it needs."""
  f, weights = config.fusion, config.stage2.loss_weights
  if f.mode not in ("soft_tokens", "residual"):
    _fail("fusion.mode", f.mode, "use 'soft_tokens' (the LLM answers from a prompt with soft tokens) or 'residual' "
          "(the encoder's logit + what LoRA changes in the LLM's answer)")
  residual_weight = weights.get("residual_answer", 0.0)
  if f.mode != "residual":
    if f.residual_gate or f.residual_soft_tokens or f.residual_confirm_size or residual_weight:
      _fail("fusion.mode", f.mode, "fusion.residual_gate, fusion.residual_soft_tokens, fusion.residual_confirm_size "
            "and the residual_answer loss need --config.fusion.mode=residual")
    return
  if not f.target_aware:
    _fail("fusion.target_aware", f.target_aware, "residual fusion adds to the encoder's like-logit: use True")
  if config.stage1.steps > 0:
    _fail("stage1.steps", config.stage1.steps, "residual fusion starts with LoRA at zero (the model is its encoder "
          "at step 0): use 0")
  if not residual_weight > 0:
    _fail("stage2.loss_weights.residual_answer", residual_weight, "residual fusion trains its answer by this loss: "
          "use a weight > 0 (e.g. 1.0)")
  if weights.get("seq_cl", 0.0):
    _fail("stage2.loss_weights.seq_cl", weights.seq_cl, "residual fusion keeps the encoder as pretrained, so its "
          "InfoNCE trains nothing: use 0")
  soft_only = [k for k in ("fused_lm", "hint_kd") if weights.get(k, 0.0)]
  if soft_only:
    _fail(f"stage2.loss_weights.{soft_only[0]}", weights[soft_only[0]], "a soft-token answer loss: use 0 with "
          "fusion.mode=residual (its answer is trained by residual_answer)")

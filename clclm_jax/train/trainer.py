"""The one trainer: a run is a list of `Stage`s, each trained by `run_stage` with the one jitted `train_step`.

A stage is data: which parameters train, where its batches come from, the loss weights, the optimizer, the
step budget and how it is validated. TALLRec (instruct -> rec, `train/loop.py`) and the CLCLMRec recipe
(encoder pretraining -> text-only -> fused, `contrastive/recipe.py`) are stage lists. Every stage gets the
mesh, gradient accumulation, the NaN guard, checkpoints inside the stage (resumed bitwise: train state and
data-iterator state), SIGTERM / Ctrl-C saves, and early stopping on its validation metric.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.train import (checkpoint, curves, evaluate, runconfig, sharding, state as state_lib,
                             step as step_lib)
from clclm_jax.train.errors import ConfigError

DONE = "stage.json"  # written last in a stage's folder: the stage is finished, this is its summary


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage. `batches()` returns a checkpointable iterator (`get_state` / `set_state`, e.g. a
  grain `DatasetIterator`) of global numpy batches of `batch_size` rows; `validate(model)` returns metrics
  whose `metric` key is maximised (early stopping, best checkpoint)."""

  name: str
  workdir: pathlib.Path
  batches: Callable[[], Iterator[dict[str, np.ndarray]]]
  loss_weights: Mapping[str, float]
  steps: int
  optim: ConfigDict  # lr, warmup_steps, schedule, max_grad_norm (<= 0: no clipping), b1, b2, weight_decay
  batch_size: int
  micro_batch_size: int
  trains: Any = nnx.Param  # an nnx filter: the parameters this stage updates; the rest stay frozen
  validate: Callable[[nnx.Module], dict[str, float]] | None = None
  metric: str = "auc"
  eval_every: int = 0  # steps between validations; <= 0: after the last step only
  # Also validate before the first step: the starting parameters are the best checkpoint (step 0) until a step
  # beats them, so a stage that starts from a good model (residual fusion: its encoder) can only keep or climb.
  validate_at_start: bool = False
  # A last, stricter check of the best validated step, when that is not the start: `confirm(model)` returns a dict
  # whose `keep` says whether it stands; if not, the starting parameters are the stage's result (best step 0). A
  # small validation subset picks a step by noise; this asks for evidence on more prompts before leaving the start.
  confirm: Callable[[nnx.Module], dict] | None = None
  patience: int = 0  # validations without a better metric before stopping; <= 0: never early
  checkpoint_every: int = 0  # steps between latest checkpoints (also at each validation and the end)
  max_seconds: float = 0.0  # > 0: the stage ends after the step that passes this much training time (all its runs)
  seed: int = 0
  config: ConfigDict | None = None  # the run's config: saved as config.json, checked on resume
  valid_reference: float | None = None  # drawn dashed on the validation curve (e.g. the like-ratio AUC)
  title: str = ""
  # What this stage trains, validates and checkpoints when it is not the run's model (`run`): a part of the model
  # trained by its own loss, e.g. a unified model's ID encoder inside its pretraining model (`pretrain.NextItemRec`,
  # which holds the same encoder variables), so its checkpoints read as that pretraining's own.
  module: nnx.Module | None = None


class MetricsLog:
  """WORKDIR/metrics.jsonl and TensorBoard events, written by process 0; rows after `resume_step` are dropped
  (a resumed stage writes them again)."""

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.on = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    if not self.on:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    kept = [r for r in curves.read_rows(self.path) if r["step"] <= resume_step]
    checkpoint.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resume_step + 1)

  def write(self, row: dict) -> None:
    if not self.on:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    for k, v in row.items():
      if isinstance(v, (int, float)) and k != "step":
        self.tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    if self.on:
      self.tb.close()


def check_finite(metrics: dict, step: int) -> None:
  """The NaN guard: stops at the first non-finite metric, naming the step and the loss terms."""
  bad = {k: float(v) for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    terms = [k for k in bad if k.startswith("loss/")] or list(bad)
    raise FloatingPointError(f"step {step}: non-finite {bad}; first bad loss term(s): {terms}. "
                             "Lower optim.lr, check the batch at this step, or the loss weights.")


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's rows of a global batch: every process reads the same batches and keeps its slice, so a run
  on n processes steps through the same global batches as on one."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return batch
  return {k: v[i * len(v) // n:(i + 1) * len(v) // n] for k, v in batch.items()}


class _Stop:
  """SIGTERM (preemption) and Ctrl-C set a flag; the loop saves and returns at the end of the step."""

  def __enter__(self):
    self.event = threading.Event()
    self.previous = {s: signal.signal(s, lambda *_: self.event.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    return self.event

  def __exit__(self, *_):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


def place(model: nnx.Module, mesh) -> None:
  """Puts every variable of `model` on the mesh once (the frozen base too): the train step and the scorers of
  every stage then take these arrays as they are, with no second copy."""
  state = nnx.state(model)
  nnx.update(model, sharding.put(state, sharding.state_sharding(state, mesh)))


def _check_stage(stage: Stage) -> int:
  if stage.batch_size <= 0 or stage.micro_batch_size <= 0:
    raise ConfigError(f"{stage.name}: batch_size={stage.batch_size} and micro_batch_size="
                      f"{stage.micro_batch_size} must be positive")
  if stage.batch_size % stage.micro_batch_size or stage.batch_size % jax.process_count():
    raise ConfigError(f"{stage.name}: batch_size={stage.batch_size} must be a multiple of micro_batch_size="
                      f"{stage.micro_batch_size} and of the {jax.process_count()} processes")
  unknown = set(stage.loss_weights) - set(step_lib.LOSSES)
  if unknown:
    raise ConfigError(f"{stage.name}: loss weights name unknown losses {sorted(unknown)}; known: "
                      f"{sorted(step_lib.LOSSES)}")
  return stage.batch_size // stage.micro_batch_size


def _confirm(stage: Stage, ckpts: checkpoint.Checkpoints, graphdef, params, frozen, start_params,
             metrics_path: pathlib.Path, best_step: int, best_metric: float) -> tuple[int, float | None, dict]:
  """`stage.confirm` on the best checkpoint: (best step, its validation metric, the check's result). Not kept: the
  starting parameters become the best checkpoint at step 0 (with the start's validation metric where step 0 was
  validated). A rerun after that finds step 0 best and checks nothing again."""
  if ckpts.best_step() == 0:  # checked and not kept before this process (a rerun): the check's result is saved
    _, meta = ckpts.restore_best(params)
    return 0, meta.get("valid", {}).get(stage.metric), meta["confirm"]
  best, _ = ckpts.restore_best(params)
  confirmed = stage.confirm(nnx.merge(graphdef, best, frozen)) | {"best_step": best_step}
  if confirmed["keep"]:
    return best_step, best_metric, confirmed
  start = [r for r in curves.read_rows(metrics_path) if r["step"] == 0 and f"valid/{stage.metric}" in r]
  valid = {k.removeprefix("valid/"): v for k, v in start[0].items() if k.startswith("valid/")} if start else {}
  ckpts.reset_best(0, start_params, {"step": 0, "valid": valid, "confirm": confirmed})
  return 0, valid.get(stage.metric), confirmed


def run_stage(stage: Stage, model: nnx.Module, mesh) -> dict:
  """Trains `stage.trains` of `model` in `stage.workdir`, resuming from its latest checkpoint; leaves the
  best validated (or, without validation, the last) parameters in `model`; returns the stage's summary."""
  accum_steps = _check_stage(stage)
  workdir = stage.workdir
  workdir.mkdir(parents=True, exist_ok=True)
  graphdef, params, frozen = nnx.split(model, stage.trains, ...)
  start_params = jax.tree.map(jnp.copy, params) if stage.confirm is not None else None  # the state donates params
  weights = {k: float(v) for k, v in stage.loss_weights.items() if v}
  tx = state_lib.make_optimizer(ConfigDict({**stage.optim.to_dict(), "total_steps": stage.steps}))
  state = state_lib.init_state(params, tx, stage.seed, mesh)
  data_iter = stage.batches()
  ckpts = checkpoint.Checkpoints(workdir)
  if stage.config is not None:
    if ckpts.latest.latest_step() is not None:
      runconfig.check_resume(stage.config, workdir)
    if jax.process_index() == 0:
      runconfig.save(stage.config, workdir)
  stopper = evaluate.EarlyStopping(stage.patience if stage.patience > 0 else stage.steps + 1)
  restored = ckpts.restore_latest(state)
  # The training time of this stage's earlier runs: a resumed stage's time budget and wall time are its whole
  # training's, however often it was stopped.
  before_s = 0.0
  if restored is not None:
    state, data_state, meta = restored
    data_iter.set_state(data_state)
    stopper = evaluate.EarlyStopping(**meta["early_stopping"])
    before_s = float(meta.get("wall_s", 0.0))
  start = int(state["step"])
  log = MetricsLog(workdir, start if restored is not None else -1)  # a fresh start drops a dead run's step-0 row
  state_sh = state_lib.state_shardings(params, tx, mesh)
  train_step = step_lib.jit_train_step(graphdef, sharding.state_sharding(frozen, mesh), tx, state_sh, mesh,
                                       loss_weights=weights, accum_steps=accum_steps)
  n_tokens, t0 = 0, time.time()
  meta = lambda: {"early_stopping": dataclasses.asdict(stopper), "wall_s": before_s + time.time() - t0}  # noqa: E731
  preempted, out_of_time, step, grad_norm, spread = False, False, start, None, None
  with _Stop() as stop, jax.set_mesh(mesh), tqdm.tqdm(total=stage.steps, initial=start, desc=stage.name,
                                                      disable=jax.process_index() != 0) as bar:
    if stage.validate is not None and stage.validate_at_start and restored is None:
      # Step 0 is a candidate like any validated step; a rerun without a latest checkpoint validates it again.
      valid = stage.validate(nnx.merge(graphdef, state["params"], frozen))
      stopper = stopper.update(valid[stage.metric], 0)
      ckpts.save_best(0, state["params"], {"step": 0, "valid": valid})
      log.write({"step": 0, **{f"valid/{k}": v for k, v in valid.items()}})
    last = start if stopper.should_stop else stage.steps  # a stage stopped early and rerun trains no further
    for step in range(start + 1, last + 1):
      batch = local_rows(next(data_iter))
      state, metrics = train_step(state, sharding.global_batch(batch, mesh), frozen)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      check_finite(metrics, step)
      grad_norm = metrics.get("grad_norm")
      if "attention_mask" in batch:  # every real token the step ran, not only its targets
        n_tokens += int((batch["attention_mask"] > 0).sum()) * jax.process_count()
      row = {"step": step, **{f"train/{k}": v for k, v in metrics.items()}}
      due = stage.eval_every > 0 and step % stage.eval_every == 0
      if stage.validate is not None and (due or step == stage.steps):
        valid = stage.validate(nnx.merge(graphdef, state["params"], frozen))
        row.update({f"valid/{k}": v for k, v in valid.items()})
        spread = valid.get("p_yes_spread")
        stopper = stopper.update(valid[stage.metric], step)
        if stopper.best_step == step:
          ckpts.save_best(step, state["params"], {"step": step, "valid": valid})
      log.write(row)
      bar.set_postfix({k.removeprefix("loss/"): f"{v:.4f}" for k, v in metrics.items() if k.startswith("loss")}
                      | ({"best": f"{stopper.best:.4f}"} if stopper.best_step >= 0 else {}))
      bar.update(1)
      preempted = stop.is_set()
      out_of_time = 0 < stage.max_seconds < before_s + time.time() - t0
      done = step == stage.steps or stopper.should_stop or preempted or out_of_time
      validated = f"valid/{stage.metric}" in row  # the early-stopping state changed: keep it with the latest
      if done or validated or (stage.checkpoint_every > 0 and step % stage.checkpoint_every == 0):
        ckpts.save_latest(state, data_iter.get_state(), meta())
      if done:
        break
  wall = time.time() - t0
  if stage.validate is None or stopper.best_step < 0:  # no validation: the last params are the stage's result
    ckpts.save_best(int(state["step"]), state["params"], {"step": int(state["step"])})
  stopped = ("preempted" if preempted else "early stopping" if stopper.should_stop else
             "time budget" if int(state["step"]) < stage.steps else "last step")
  best_step, best_metric, confirmed = (stopper.best_step, stopper.best, None) if stage.validate else (
      int(state["step"]), None, None)
  if stage.confirm is not None and not preempted and best_step > 0:
    best_step, best_metric, confirmed = _confirm(stage, ckpts, graphdef, state["params"], frozen, start_params,
                                                 log.path, best_step, best_metric)
  summary = {"stage": stage.name, "steps": int(state["step"]), "total_steps": stage.steps,
             "preempted": preempted, "stopped": stopped, "best_step": best_step,
             f"valid_{stage.metric}": best_metric, **({"confirm": confirmed} if confirmed else {}),
             "tokens_per_s": n_tokens / max(wall, 1e-9), "wall_s": before_s + wall,
             "collapsed": evaluate.collapsed(grad_norm=grad_norm, valid=spread)}
  best, _ = ckpts.restore_best(state["params"])
  nnx.update(model, best)
  log.close()
  ckpts.close()
  if jax.process_index() == 0:
    curves.write_curves(log.path, workdir / "curves.png", title=stage.title or stage.name,
                        valid_reference=stage.valid_reference)
    if not preempted:
      checkpoint.write_text(workdir / DONE, json.dumps(summary, indent=2) + "\n")
  return summary


def finished(stage: Stage) -> dict | None:
  """The summary of a stage that ran to its end in `stage.workdir`, or None."""
  path = stage.workdir / DONE
  return json.loads(path.read_text()) if path.is_file() else None


def restore_best(stage: Stage, model: nnx.Module) -> None:
  """Puts a finished stage's best parameters into `model`."""
  _, params, _ = nnx.split(model, stage.trains, ...)
  ckpts = checkpoint.Checkpoints(stage.workdir)
  try:
    best, _ = ckpts.restore_best(params)
  finally:
    ckpts.close()
  nnx.update(model, best)


class RunLock:
  """An exclusive lock on a run folder (WORKDIR/.lock, holding the owner's pid), so that a second training in the
  same folder stops at once instead of interleaving metrics.jsonl and checkpoints with the first."""

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / ".lock"

  def __enter__(self):
    import fcntl  # pylint: disable=g-import-not-at-top
    self.file = None
    if jax.process_index() != 0:  # the processes of one run share the folder: process 0 holds the lock
      return self
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.file = self.path.open("a+")
    except OSError as e:  # a read-only folder or file system
      raise ConfigError(f"{self.path.parent}: cannot write the run there ({e.strerror}): pass a --workdir you can "
                        "write to") from None
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.seek(0)
      owner = self.file.read().strip() or "another process"
      self.file.close()
      raise ConfigError(f"{self.path.parent} is in use by process {owner} (a training is running there): wait "
                        "for it, or pass another --workdir") from None
    self.file.seek(0)
    self.file.truncate()
    self.file.write(str(os.getpid()))
    self.file.flush()
    return self

  def __exit__(self, *_):
    if self.file is not None:
      self.file.close()  # closing releases the lock


def run(stages: Sequence[Stage], model: nnx.Module, mesh, log: Callable[[str], None] = print,
        held: Sequence[pathlib.Path] | None = None) -> list[dict]:
  """Runs the stages in order on `model` (placed on `mesh` once); a finished stage is not rerun: its best
  parameters are restored. Stops after a preempted stage (its summary says so). A stage with a `module` trains
  that module instead of `model`. With `held` (the folders the caller has locked), every other stage folder is
  locked while its stage runs or is restored: stage folders that runs share (an ID encoder's pretraining, a
  unified run's stage 1) are then trained by one run at a time."""
  place(model, mesh)
  summaries = []
  for stage in stages:
    own = held is None or pathlib.Path(stage.workdir).resolve() in {pathlib.Path(h).resolve() for h in held}
    with contextlib.nullcontext() if own else RunLock(stage.workdir):
      summary = _run_or_restore(stage, model, mesh, log)
    summaries.append(summary)
    if summary["preempted"]:
      break
  return summaries


def _run_or_restore(stage: Stage, model: nnx.Module, mesh, log: Callable[[str], None]) -> dict:
  part = model if stage.module is None else stage.module
  if part is not model:
    place(part, mesh)  # its variables outside `model` (those it shares are placed already)
  summary = finished(stage)
  if summary is not None and stage.config is not None:
    runconfig.check_resume(stage.config, stage.workdir)  # a finished run rerun with other values stops too
  if summary is not None and summary.get("stopped") == "last step" and stage.steps > summary["total_steps"]:
    summary = None  # finished at its old length: a longer run goes on from its last checkpoint
  if summary is not None:
    restore_best(stage, part)
    log(f"{stage.name}: finished before (step {summary['steps']}), its parameters restored")
  else:
    summary = run_stage(stage, part, mesh)
  return summary


def run_once(config: ConfigDict, workdir: pathlib.Path, summary_name: str,
             build: Callable[[], tuple[Any, Sequence[Stage], nnx.Module, Any]],
             finish: Callable[[Any, list[dict]], dict], log: Callable[[str], None] = print) -> dict:
  """A whole run in its locked folder: a finished run (WORKDIR/`summary_name` exists) returns its summary;
  otherwise `build()` gives (run, stages, model, mesh), the stages train (resumable), and `finish(run,
  stage_summaries)` gives the summary, written last. A preempted stage's summary is returned as it is."""
  with RunLock(workdir):
    path = workdir / summary_name
    if path.is_file():
      runconfig.check_resume(config, workdir)
      log(f"{workdir} is finished: its summary follows (delete {path} to evaluate it again)")
      return json.loads(path.read_text())
    r, stages, model, mesh = build()
    # Zero-shot, or every stage in a subfolder: no stage writes the config the run used in its folder.
    if not any(s.workdir == workdir and s.config is not None for s in stages) and jax.process_index() == 0:
      workdir.mkdir(parents=True, exist_ok=True)
      runconfig.save(config, workdir)
    summaries = run(stages, model, mesh, log, held=(workdir,))
    if summaries and summaries[-1]["preempted"]:
      return summaries[-1]
    summary = finish(r, summaries)
    if jax.process_index() == 0:
      checkpoint.write_text(path, json.dumps(summary, indent=2) + "\n")
    return summary

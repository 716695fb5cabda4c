"""TALLRec from a config: model, data and the stage list the one trainer (`train/trainer.py`) runs.

Stages (`config.stages`): "instruct" (Alpaca instruction tuning, in WORKDIR/instruct) and "rec"
(TALLRec rec tuning, in WORKDIR, initialised from the previous stage's LoRA). The last stage is
evaluated on the test split with its best checkpoint.
"""

import pathlib
import time

import jax
from flax import nnx
from ml_collections import ConfigDict

from clclm_jax.data import configured, fewshot, instruct, paths, pipeline, tallrec, tokenize
from clclm_jax.model import build, peft
from clclm_jax.train import (checkpoint, evaluate, predictions, runconfig, sharding, state as state_lib,
                             trainer)
from clclm_jax.train.errors import ConfigError


def _eval_batches(examples, config: ConfigDict):
  return pipeline.eval_dataset(examples, batch_size=config.train.eval_batch_size // jax.process_count(),
                               pad_multiple=config.data.pad_multiple, max_widths=config.data.eval_widths)


def like_ratio_references(config: ConfigDict, splits=("valid", "test"), sp=None) -> dict[str, float]:
  """`{split}_like_ratio_auc`: the no-training reference (`evaluate.like_ratio_auc`) on the prompts each split
  scores, so a run's AUC can be read against what the histories alone give."""
  sp = configured.rec_splits(config) if sp is None else sp
  return {f"{s}_like_ratio_auc": evaluate.like_ratio_auc(configured.eval_interactions(config, sp, s)) for s in splits}


def rec_data(config: ConfigDict, tokenizer, splits=("valid", "test"), sp=None, context: int | None = None):
  """(training examples, {split: eval batches}) for the TALLRec task of `config.data` (of `sp` when given);
  prompts beyond `context` tokens (the model's max_position_embeddings) are refused."""
  d, sp = config.data, configured.rec_splits(config) if sp is None else sp
  encode = lambda xs: pipeline.tallrec_examples(  # noqa: E731
      xs, sp.catalogue, d.domain, tokenizer, cutoff_len=d.cutoff_len, train_on_inputs=d.train_on_inputs,
      template=d.template, context=context)
  evals = {s: _eval_batches(encode(configured.eval_interactions(config, sp, s)), config) for s in splits}
  return encode(configured.train_interactions(config, sp)), evals


def instruct_data(config: ConfigDict, tokenizer):
  records = instruct.read_alpaca(paths.data_path(config.instruct.file))
  if config.instruct.num_examples > 0:
    records = fewshot.fewshot(records, config.instruct.num_examples, config.data.fewshot_seed)
  return pipeline.alpaca_examples(records, tokenizer, cutoff_len=config.data.cutoff_len,
                                  train_on_inputs=config.data.train_on_inputs, template=config.data.template), {}


def tallrec_stage(config: ConfigDict, name: str, workdir: pathlib.Path, tokenizer, scorer: evaluate.Scorer,
                  sp: tallrec.TallrecSplits | None, context: int | None = None) -> trainer.Stage:
  """A TALLRec stage as data: "instruct" (Alpaca instruction tuning; batch size, steps and learning rate from
  `config.instruct`) or "rec" (Yes/No rec tuning on `data.shots` prompts, validated by AUC)."""
  t, optim = config.train, config.optim
  if name == "rec":
    examples, evals = rec_data(config, tokenizer, splits=("valid",), sp=sp, context=context)
    batch_size, max_steps = t.batch_size, t.max_steps
    validate = lambda model: scorer(model, evals["valid"], desc="valid").metrics()  # noqa: E731
  elif name == "instruct":
    examples, _ = instruct_data(config, tokenizer)
    batch_size, max_steps, validate = config.instruct.batch_size, config.instruct.max_steps, None
    optim = ConfigDict({**optim.to_dict(), "lr": config.instruct.lr, "warmup_steps": config.instruct.warmup_steps})
  else:
    raise ConfigError(f"config.stages holds {name!r}: the TALLRec stages are 'instruct' and 'rec'")
  if len(examples) < batch_size:
    field, given = (("train", f"data.shots={config.data.shots}") if name == "rec" else
                    ("instruct", f"instruct.num_examples={config.instruct.num_examples}"))
    raise ConfigError(f"config.{field}.batch_size={batch_size} is more than the {len(examples)} training examples "
                      f"({given}): lower it, or train on more")
  steps = max_steps if max_steps > 0 else t.num_epochs * max(1, len(examples) // batch_size)
  batches = lambda: iter(pipeline.train_dataset(  # noqa: E731
      examples, batch_size=batch_size, seed=config.seed, pad_multiple=config.data.pad_multiple, shard_index=0,
      shard_count=1))
  reference = like_ratio_references(config, ("valid",), sp)["valid_like_ratio_auc"] if name == "rec" else None
  return trainer.Stage(
      name, workdir, batches, dict(config.loss_weights), steps, optim, batch_size,
      min(t.micro_batch_size, batch_size), trains=nnx.Param, validate=validate, eval_every=t.eval_every,
      patience=t.patience, checkpoint_every=t.checkpoint_every, seed=config.seed, config=config,
      valid_reference=reference, title=f"{config.name}: {name} stage")


def best_params(workdir: pathlib.Path, model, mesh):
  """(params, meta) of the best checkpoint in `workdir`, sharded like the model's trainable state."""
  _, params, _ = state_lib.split_model(model)
  ckpts = checkpoint.Checkpoints(workdir)
  try:
    return ckpts.restore_best(sharding.put(params, sharding.state_sharding(params, mesh)))
  finally:
    ckpts.close()


def export_best_peft(config: ConfigDict, workdir: str | pathlib.Path, out_dir: str | pathlib.Path) -> pathlib.Path:
  """Writes the best checkpoint's LoRA in `workdir` as a Hugging Face PEFT adapter folder."""
  runconfig.check_model(config, pathlib.Path(workdir))
  model, _ = build.build_model(config)
  params, _ = best_params(pathlib.Path(workdir), model, sharding.make_mesh(config.mesh))
  nnx.update(model, jax.device_get(params))
  base = config.model.source if not config.model.preset else f"random {config.model.preset} preset"
  return peft.export_peft(model, out_dir, base_model_name_or_path=base)


def evaluate_split(config: ConfigDict, workdir: str | pathlib.Path, split: str = "test", model=None,
                   tokenizer=None, mesh=None, scorer: evaluate.Scorer | None = None) -> dict:
  """Scores `split` with the best checkpoint; writes WORKDIR/eval/<split>_metrics.json and
  <split>_predictions.jsonl (P(Yes) per prompt). With another `data.domain` than the run trained on (TALLRec's
  cross-domain test), the files are <split>_<domain>_*."""
  workdir = pathlib.Path(workdir)
  runconfig.check_model(config, workdir)
  mesh = mesh or sharding.make_mesh(config.mesh)
  if model is None:
    model, tokenizer = build.build_model(config)
  if scorer is None:
    trainer.place(model, mesh)
    scorer = evaluate.make_scorer(model, mesh, *tokenize.answer_token_ids(tokenizer, config.data.template))
  params, meta = best_params(workdir, model, mesh)
  nnx.update(model, params)
  sp = configured.rec_splits(config)
  _, evals = rec_data(config, tokenizer, splits=(split,), sp=sp, context=model.config.max_position_embeddings)
  t0 = time.time()
  scores = scorer(model, evals[split], desc=split)
  reference = like_ratio_references(config, (split,), sp)[f"{split}_like_ratio_auc"]
  metrics = {**scores.metrics(), "like_ratio_auc": reference, "best_step": meta["step"], "wall_s": time.time() - t0,
             "domain": config.data.domain, "trained_on": runconfig.trained_domain(workdir) or config.data.domain}
  if jax.process_index() == 0:
    name = runconfig.eval_name(config, workdir, split)
    positions = configured.eval_positions(config, sp, split)[scores.index]
    predictions.write(workdir, name, positions, scores.label, scores.p_yes)
    predictions.write_metrics(workdir, name, metrics)
  return metrics


def train(config: ConfigDict, workdir: str | pathlib.Path) -> dict:
  """All stages of `config` through the one trainer (`config.stages`; the last in `workdir`, the others in
  WORKDIR/<stage>), then the test AUC of the last stage's best checkpoint; returns the summary."""
  workdir = pathlib.Path(workdir)
  runconfig.validate(config)
  sharding.maybe_initialize_distributed(config)
  mesh = sharding.make_mesh(config.mesh)
  with trainer.RunLock(workdir):
    model, tokenizer = build.build_model(config)
    scorer = evaluate.make_scorer(model, mesh, *tokenize.answer_token_ids(tokenizer, config.data.template))
    sp = configured.rec_splits(config) if "rec" in config.stages else None
    if sp is not None:
      configured.check_splits(config, sp)
    names = list(config.stages)
    stages = [tallrec_stage(config, name, workdir if i == len(names) - 1 else workdir / name, tokenizer, scorer,
                            sp, model.config.max_position_embeddings) for i, name in enumerate(names)]
    summary = trainer.run(stages, model, mesh)[-1]
    if summary["preempted"]:
      return summary
    if names[-1] == "rec":
      summary.update(like_ratio_references(config, ("valid",), sp))
      if config.data.test_size != 0:
        test = evaluate_split(config, workdir, "test", model, tokenizer, mesh, scorer)
        summary.update(test_auc=test["auc"], test_like_ratio_auc=test["like_ratio_auc"],
                       collapsed=evaluate.collapsed(summary.get("collapsed"), test=test["p_yes_spread"]))
    return summary


def published_auc(config: ConfigDict | None, shots: int | None) -> float | None:
  """TALLRec-7B's published test AUC (x 100) for the run's domain and shots, where the run scores TALLRec's
  whole built-in test set at one of the paper's shot counts; else None."""
  if config is None or configured.uses_files(config) or config.data.test_size > 0:
    return None
  return tallrec.PUBLISHED_AUC.get(config.data.domain, {}).get(shots)


def format_summary(summary: dict, config: ConfigDict | None = None, workdir: str | pathlib.Path | None = None,
                   config_file: str | None = None) -> str:
  """The end-of-run table: AUCs with the history like-ratio on the same prompts (and TALLRec-7B's published
  figure for the same shots) beside them, wall time, where the model and predictions are, what to run next."""
  shots = summary.get("shots", None if config is None else config.data.shots)
  rows = [("best step", summary.get("best_step")), ("valid AUC", summary.get("valid_auc")),
          ("test AUC", summary.get("test_auc"))]
  if "encoder_valid_auc" in summary:  # fused runs (contrastive/recipe.py)
    rows.insert(1, ("encoder valid AUC", summary["encoder_valid_auc"]))
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)  # noqa: E731
  lines = []
  if summary.get("preempted"):
    lines.append(f"preempted at step {summary['steps']} of {summary['stage']}: run the same command again to "
                 "continue")
  if summary.get("collapsed"):
    lines.append(f"collapsed: {summary['collapsed']} (the model answers every prompt alike): lower optim.lr and "
                 "train again in a new --workdir")
  for k, v in rows:
    ref = summary.get(k.split()[0] + "_like_ratio_auc") if k in ("valid AUC", "test AUC") else None
    note = f"   history like-ratio on the same prompts: {ref:.4f}" if ref is not None and v is not None else ""
    if (n := summary.get({"encoder valid AUC": "encoder_valid_n", "valid AUC": "valid_n"}.get(k, ""))) is not None:
      note = f"   on {n} prompts" + (";" + note[2:] if note else "")
    lines.append(f"{k:<18}{fmt(v):>12}{note}")
    if k == "valid AUC" and (c := summary.get("confirm")):  # residual fusion's check of its best step
      lines.append(f"{'confirmed':<18}{'kept' if c['keep'] else 'not kept':>12}   step {c['best_step']} against the "
                   f"encoder alone on {c['n']} validation prompts: {c['difference']:+.4f} (95% {c['ci95'][0]:+.4f} "
                   f".. {c['ci95'][1]:+.4f})" + ("" if c["keep"] else "; the model is its encoder"))
  published = published_auc(config, shots)
  if published is not None and summary.get("test_auc") is not None:
    lines.append(f"{'':<30}   TALLRec, LLaMA-7B, {shots}-shot (published): {published / 100:.4f}")
  if (wall := summary.get("wall_s")) is not None:
    lines.append(f"{'wall time':<18}{f'{int(wall // 60)} min {wall % 60:02.0f} s':>12}")
  if workdir is not None:
    w = pathlib.Path(workdir)
    lines.append(f"{'run folder':<18}{w} (config.json, metrics.jsonl, curves.png, checkpoints/)")
    if (w / "eval" / "test_predictions.jsonl").is_file():
      lines.append(f"{'predictions':<18}{w / 'eval' / 'test_predictions.jsonl'} (record, label, p_yes)")
    if config_file and not summary.get("preempted"):
      again = f"python eval.py --config={config_file} --workdir={w}"
      lines += [f"{'score again':<18}{again} [--split=valid]",
                f"{'compare':<18}{again} --compare_to=<another run folder>  (paired 95% interval)"]
      if "fusion" not in config:
        lines.append(f"{'export':<18}{again} --export_peft=<folder>  (a PEFT adapter for transformers)")
  return "\n".join(lines)
